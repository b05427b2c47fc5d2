//! `batchd bench`: a real server, wired exactly as `batchd serve` wires it ([`start_with`]),
//! over a fresh database, driven over loopback HTTP and measured with a no-op handler.
//!
//! What it measures, in this order:
//! 1. submit rate: `items` items in batches of `batch_size`, POSTed by `clients` concurrent
//!    HTTP clients to a queue nothing runs (`pull`), first request to last 202;
//! 2. end-to-end rate: the same submissions to a queue with the no-op handler, from the
//!    first request to the moment the store shows every batch finished; every item is
//!    checked to have completed, so a run that loses or skips work fails instead of
//!    reporting a figure. The store is asked every 100 ms until the handler has run as many
//!    times as there are items, then every 2 ms: asked every 2 ms all along, the asking
//!    loaded the server it measured;
//! 3. pick-up latency on an idle queue: one 1-item batch at a time, from the 202 to the
//!    moment the handler starts (0 when it started before the reply arrived);
//! 4. with `large`: claiming 100 items with 10,000 and with 1,000,000 items queued, and the
//!    latency of `GET /v1/batches/{id}` and `GET /v1/batches/{id}/items` with 1,000,000
//!    items stored (at most two minutes of calls; the report says how many were made);
//! 5. the process's peak resident memory (`VmHWM`), the server and the load together.

use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use async_trait::async_trait;
use batchd_domain::BatchStatus;
use batchd_executor::{Completion, Handler, HandlerError, HandlerRegistry, ItemContext};
use batchd_storage::scratch::{ScratchDatabase, server_version};
use batchd_storage::{BatchFilter, ClaimRequest, Finish, Outcome, PageRequest, Scope, Store};
use futures_util::StreamExt;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};

use crate::run::{ServerHandle, start_with};
use crate::settings::{Overrides, QueueSettings, Settings};

/// The no-op queue of the end-to-end run.
const NOOP_QUEUE: &str = "bench";
/// The queue of the pick-up probes.
const PROBE_QUEUE: &str = "bench-probe";
/// A `pull` queue: nothing in the server runs it, so what is submitted there stays queued.
const HOLD_QUEUE: &str = "bench-hold";
/// Items claimed per claim in the claim-cost measurement.
const CLAIM_SIZE: usize = 100;
/// Claims timed at each queue depth.
const CLAIM_SAMPLES: usize = 50;
/// The status calls of `--large` stop here even if fewer than asked were made: a slow
/// call should show in the figures, not make the run endless.
const STATUS_CALLS_BUDGET: Duration = Duration::from_secs(120);

/// Which database the bench runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BenchBackend {
    Sqlite,
    Postgres,
}

impl BenchBackend {
    /// `sqlite` or `postgres`, as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            BenchBackend::Sqlite => "sqlite",
            BenchBackend::Postgres => "postgres",
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub backend: BenchBackend,
    /// PostgreSQL: a server to create the fresh database on (default:
    /// `BATCHD_TEST_DATABASE_URL`, then `DATABASE_URL`, then the local server).
    pub database_url: Option<String>,
    pub items: usize,
    pub batch_size: usize,
    /// The no-op queue's concurrency (and the server's `executor.max_running`).
    pub concurrency: usize,
    /// HTTP requests in flight while submitting.
    pub clients: usize,
    pub pickup_samples: usize,
    /// Also measure claims and status calls with 1,000,000 items stored.
    pub large: bool,
    pub large_items: usize,
    pub status_calls: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            backend: BenchBackend::Sqlite,
            database_url: None,
            items: 20_000,
            batch_size: 1_000,
            concurrency: 256,
            clients: 4,
            pickup_samples: 200,
            large: false,
            large_items: 1_000_000,
            status_calls: 10_000,
        }
    }
}

/// Everything a run measured, and where.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub machine: Machine,
    pub workload: Workload,
    pub submit: Throughput,
    pub end_to_end: Throughput,
    pub pickup: Latency,
    pub large: Option<LargeReport>,
    /// Peak resident memory of the process (server and load generator), in bytes.
    pub peak_rss_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu: Option<String>,
    pub os: String,
    pub backend: BenchBackend,
    /// `PostgreSQL 15.19 (...)` or `SQLite 3.x`.
    pub database: String,
    /// `release` or `debug`: figures from a debug build say little.
    pub build: &'static str,
    pub batchd_version: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct Workload {
    pub items: usize,
    pub batch_size: usize,
    pub concurrency: usize,
    pub clients: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    pub items: usize,
    pub seconds: f64,
    pub items_per_second: f64,
}

impl Throughput {
    fn new(items: usize, elapsed: Duration) -> Self {
        let seconds = elapsed.as_secs_f64();
        Self {
            items,
            seconds,
            items_per_second: if seconds > 0.0 { items as f64 / seconds } else { 0.0 },
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub samples: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    fn of(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        let ms = |d: Duration| d.as_secs_f64() * 1_000.0;
        let at = |q: f64| -> f64 {
            if samples.is_empty() {
                return 0.0;
            }
            // Nearest rank: the smallest sample with at least q of them at or below it.
            let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
            ms(samples[rank - 1])
        };
        Self {
            samples: samples.len(),
            p50_ms: at(0.50),
            p99_ms: at(0.99),
            max_ms: samples.last().copied().map_or(0.0, ms),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LargeReport {
    /// Items stored (queued) when the status calls ran.
    pub items_stored: usize,
    /// Submitting them: the submit rate at scale.
    pub fill: Throughput,
    pub claim_at_10k: Latency,
    pub claim_at_large: Latency,
    /// p50 at the large depth over p50 at 10,000.
    pub claim_ratio: f64,
    pub get_batch: Latency,
    pub get_items_page: Latency,
}

/// Answers every item at once with `null`; the probe variant also says when it started.
#[derive(Debug, Clone)]
struct NoopHandler {
    starts: Option<mpsc::UnboundedSender<(String, Instant)>>,
    runs: Option<Arc<Runs>>,
}

#[async_trait]
impl Handler for NoopHandler {
    async fn run(&self, item: ItemContext) -> Result<Completion, HandlerError> {
        if let Some(starts) = &self.starts {
            let _ = starts.send((item.item_id.clone(), Instant::now()));
        }
        if let Some(runs) = &self.runs {
            runs.add_one();
        }
        Ok(Completion::Completed(Value::Null))
    }
}

/// How many times a handler has run, and a wake-up when that reaches a target: the wait for
/// the end-to-end run asks the store only once every item could have finished.
#[derive(Debug)]
struct Runs {
    count: AtomicUsize,
    target: usize,
    reached: Notify,
}

impl Runs {
    fn new(target: usize) -> Self {
        Self {
            count: AtomicUsize::new(0),
            target,
            reached: Notify::new(),
        }
    }

    fn add_one(&self) {
        if self.count.fetch_add(1, Ordering::SeqCst) + 1 == self.target {
            self.reached.notify_one();
        }
    }

    fn reached_target(&self) -> bool {
        self.count.load(Ordering::SeqCst) >= self.target
    }

    /// Waits until the count reaches the target, or `timeout` passes.
    async fn wait(&self, timeout: Duration) {
        if !self.reached_target() {
            let _ = tokio::time::timeout(timeout, self.reached.notified()).await;
        }
    }
}

/// A fresh database for one run, removed afterwards.
enum FreshDatabase {
    Sqlite(tempfile::TempDir),
    Postgres(ScratchDatabase),
}

impl FreshDatabase {
    async fn create(options: &BenchOptions) -> anyhow::Result<(FreshDatabase, String)> {
        match options.backend {
            BenchBackend::Sqlite => {
                let dir = tempfile::Builder::new()
                    .prefix("batchd-bench-")
                    .tempdir()
                    .context("cannot create a temporary directory")?;
                let url = format!("sqlite://{}", dir.path().join("bench.db").display());
                Ok((FreshDatabase::Sqlite(dir), url))
            }
            BenchBackend::Postgres => {
                let server = options
                    .database_url
                    .clone()
                    .or_else(|| std::env::var("BATCHD_TEST_DATABASE_URL").ok().filter(|u| !u.is_empty()))
                    .or_else(|| std::env::var("DATABASE_URL").ok().filter(|u| u.starts_with("postgres")))
                    .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
                let database = ScratchDatabase::create(&server, "batchd_bench")
                    .await
                    .with_context(|| {
                        format!(
                            "cannot create a database for the bench on {}",
                            batchd_storage::redact_url(&server)
                        )
                    })?;
                let url = database.url().to_owned();
                Ok((FreshDatabase::Postgres(database), url))
            }
        }
    }

    async fn remove(self) -> anyhow::Result<()> {
        match self {
            FreshDatabase::Sqlite(dir) => dir.close().context("cannot remove the bench's SQLite file"),
            FreshDatabase::Postgres(database) => database
                .drop_database()
                .await
                .context("cannot drop the bench's database"),
        }
    }
}

/// Runs the bench. Must be called inside a multi-threaded tokio runtime.
pub async fn run(options: BenchOptions) -> anyhow::Result<BenchReport> {
    ensure!(options.items > 0, "--items must be at least 1");
    ensure!(
        (1..=10_000).contains(&options.batch_size),
        "--batch-size must be between 1 and 10000"
    );
    ensure!(options.concurrency > 0, "--concurrency must be at least 1");
    ensure!(options.clients > 0, "--clients must be at least 1");
    let (database, url) = FreshDatabase::create(&options).await?;
    let database_version = server_version(&url).await.context("cannot read the database version")?;
    let outcome = run_on(&options, &url, database_version).await;
    let removed = database.remove().await;
    let report = outcome?;
    removed?;
    Ok(report)
}

async fn run_on(options: &BenchOptions, url: &str, database_version: String) -> anyhow::Result<BenchReport> {
    let (starts_tx, mut starts) = mpsc::unbounded_channel();
    let noop_runs = Arc::new(Runs::new(options.items));
    let mut handlers = HandlerRegistry::with_builtins();
    handlers.register(
        "bench-noop",
        NoopHandler {
            starts: None,
            runs: Some(noop_runs.clone()),
        },
    );
    handlers.register(
        "bench-probe",
        NoopHandler {
            starts: Some(starts_tx),
            runs: None,
        },
    );
    let settings = bench_settings(options, url)?;
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot bind a loopback port")?;
    let server = start_with(settings, listener, handlers).await?;
    let measured = measure(options, &server, &noop_runs, &mut starts, database_version).await;
    server.shutdown().await?;
    measured
}

fn bench_settings(options: &BenchOptions, url: &str) -> anyhow::Result<Settings> {
    let overrides = Overrides {
        bind: None,
        database_url: Some(url.to_owned()),
    };
    let mut settings = Settings::load(None, &Default::default(), &overrides)?;
    settings.retention.finished_batch_days = 0;
    settings.executor.max_running = u32::try_from(options.concurrency).context("--concurrency is too large")?;
    let batch_size = u32::try_from(options.batch_size).context("--batch-size is too large")?;
    let queue = |handler: &str, concurrency: usize| QueueSettings {
        handler: handler.to_owned(),
        concurrency: u32::try_from(concurrency).unwrap_or(u32::MAX),
        max_items: batch_size.max(1_000),
        max_attempts: 1,
        ..QueueSettings::from_defaults(&settings.queue_defaults)
    };
    let queues = [
        (NOOP_QUEUE, queue("bench-noop", options.concurrency)),
        (PROBE_QUEUE, queue("bench-probe", 1)),
        (HOLD_QUEUE, queue("pull", 1)),
    ];
    for (name, queue) in queues {
        settings.queues.insert(name.to_owned(), queue);
    }
    Ok(settings)
}

async fn measure(
    options: &BenchOptions,
    server: &ServerHandle,
    noop_runs: &Runs,
    starts: &mut mpsc::UnboundedReceiver<(String, Instant)>,
    database: String,
) -> anyhow::Result<BenchReport> {
    let http = Http::new(server)?;
    let store = server.store().clone();

    let bodies = batch_bodies(HOLD_QUEUE, options.items, options.batch_size);
    let (_, elapsed) = http.submit_all(bodies, options.clients).await?;
    let submit = Throughput::new(options.items, elapsed);

    let bodies = batch_bodies(NOOP_QUEUE, options.items, options.batch_size);
    let started = Instant::now();
    let (ids, _) = http.submit_all(bodies, options.clients).await?;
    // Until every item has run, the store is asked only every 100 ms (should items be lost
    // or never run, the wait still ends, and the check below says why); then every 2 ms.
    wait_until_finished(store.as_ref(), NOOP_QUEUE, Duration::from_secs(600), || async {
        if noop_runs.reached_target() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        } else {
            noop_runs.wait(Duration::from_millis(100)).await;
        }
    })
    .await?;
    let end_to_end = Throughput::new(options.items, started.elapsed());
    check_all_completed(store.as_ref(), &ids, options.items).await?;

    let pickup = pickup_latency(&http, store.as_ref(), starts, options.pickup_samples).await?;
    let large = if options.large {
        Some(large_run(options, &http, store.as_ref()).await?)
    } else {
        None
    };

    Ok(BenchReport {
        machine: Machine {
            cores: std::thread::available_parallelism().map_or(1, usize::from),
            cpu: cpu_model(),
            os: format!("{} {}", std::env::consts::OS, std::env::consts::ARCH),
            backend: options.backend,
            database,
            build: if cfg!(debug_assertions) { "debug" } else { "release" },
            batchd_version: env!("CARGO_PKG_VERSION"),
        },
        workload: Workload {
            items: options.items,
            batch_size: options.batch_size,
            concurrency: options.concurrency,
            clients: options.clients,
        },
        submit,
        end_to_end,
        pickup,
        large,
        peak_rss_bytes: peak_rss_bytes(),
    })
}

/// Request bodies of `items` items in batches of `batch_size`; each input is distinct.
fn batch_bodies(queue: &str, items: usize, batch_size: usize) -> Vec<Vec<u8>> {
    (0..items)
        .step_by(batch_size)
        .map(|first| {
            let last = (first + batch_size).min(items);
            let items: Vec<Value> = (first..last).map(|n| json!({"input": {"n": n}})).collect();
            serde_json::to_vec(&json!({"queue": queue, "items": items})).expect("JSON values serialize")
        })
        .collect()
}

/// The server's HTTP API over loopback.
struct Http {
    client: reqwest::Client,
    base: String,
}

impl Http {
    fn new(server: &ServerHandle) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Self {
            client,
            base: format!("http://{}", server.local_addr()),
        })
    }

    /// Submits one batch; its 202 reply.
    async fn submit(&self, body: Vec<u8>) -> anyhow::Result<Value> {
        let response = self
            .client
            .post(format!("{}/v1/batches", self.base))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .context("cannot submit a batch")?;
        let status = response.status();
        let reply: Value = response.json().await.context("the submit reply is not JSON")?;
        if status != reqwest::StatusCode::ACCEPTED {
            bail!("submitting a batch answered {status}: {reply}");
        }
        Ok(reply)
    }

    /// Submits every body with `clients` requests in flight; the batch ids and the time from
    /// the first request to the last reply.
    async fn submit_all(&self, bodies: Vec<Vec<u8>>, clients: usize) -> anyhow::Result<(Vec<String>, Duration)> {
        let started = Instant::now();
        let replies: Vec<anyhow::Result<Value>> = futures_util::stream::iter(bodies)
            .map(|body| self.submit(body))
            .buffer_unordered(clients)
            .collect()
            .await;
        let elapsed = started.elapsed();
        let ids = replies
            .into_iter()
            .map(|reply| {
                let reply = reply?;
                reply["id"]
                    .as_str()
                    .map(str::to_owned)
                    .with_context(|| format!("a submit reply without an id: {reply}"))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok((ids, elapsed))
    }

    /// GETs a path and checks it answers 200; how long that took.
    async fn timed_get(&self, path: &str) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let response = self
            .client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .with_context(|| format!("GET {path} failed"))?;
        let status = response.status();
        let body = response.bytes().await.with_context(|| format!("GET {path} failed"))?;
        let elapsed = started.elapsed();
        ensure!(status == reqwest::StatusCode::OK, "GET {path} answered {status}");
        ensure!(!body.is_empty(), "GET {path} answered an empty body");
        Ok(elapsed)
    }
}

/// Asks the store until no batch of `queue` is active, calling `pause` between asks.
async fn wait_until_finished<F: Future<Output = ()>>(
    store: &dyn Store,
    queue: &str,
    timeout: Duration,
    pause: impl Fn() -> F,
) -> anyhow::Result<()> {
    let filter = BatchFilter {
        statuses: BatchStatus::ACTIVE.to_vec(),
        queue: Some(queue.to_owned()),
        ..BatchFilter::default()
    };
    let page = PageRequest { cursor: None, limit: 1 };
    let deadline = Instant::now() + timeout;
    loop {
        if store.list_batches(Scope::All, &filter, &page).await?.rows.is_empty() {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the batches of {queue} did not finish within {timeout:?}"
        );
        pause().await;
    }
}

/// Fails unless every batch completed with every item completed.
async fn check_all_completed(store: &dyn Store, ids: &[String], items: usize) -> anyhow::Result<()> {
    let mut completed = 0;
    for id in ids {
        let batch = store.get_batch(Scope::All, id).await?;
        ensure!(
            batch.status == BatchStatus::Completed,
            "batch {id} ended {}",
            batch.status
        );
        completed += batch.counts.completed as usize;
    }
    ensure!(
        completed == items,
        "{completed} of {items} items completed: the run did not do the work it timed"
    );
    Ok(())
}

async fn pickup_latency(
    http: &Http,
    store: &dyn Store,
    starts: &mut mpsc::UnboundedReceiver<(String, Instant)>,
    samples: usize,
) -> anyhow::Result<Latency> {
    let mut latencies = Vec::with_capacity(samples);
    for n in 0..samples {
        let body = serde_json::to_vec(&json!({"queue": PROBE_QUEUE, "items": [{"input": {"n": n}}]}))?;
        let reply = http.submit(body).await?;
        let accepted = Instant::now();
        let item_id = reply["item_ids"][0]
            .as_str()
            .with_context(|| format!("a submit reply without item ids: {reply}"))?
            .to_owned();
        let (started_id, started) = tokio::time::timeout(Duration::from_secs(30), starts.recv())
            .await
            .context("a probe item did not start within 30 s")?
            .context("the probe handler is gone")?;
        ensure!(started_id == item_id, "probe {item_id} was overtaken by {started_id}");
        latencies.push(started.saturating_duration_since(accepted));
        // The next probe starts on an idle queue: this one's result is committed.
        let batch_id = reply["id"].as_str().context("a submit reply without an id")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !store.get_batch(Scope::All, batch_id).await?.status.is_terminal() {
            ensure!(Instant::now() < deadline, "probe batch {batch_id} did not finish");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    Ok(Latency::of(latencies))
}

async fn large_run(options: &BenchOptions, http: &Http, store: &dyn Store) -> anyhow::Result<LargeReport> {
    // The hold queue already has `items` queued from the submit run.
    let small_depth = 10_000usize;
    let queued = options.items;
    if queued < small_depth {
        let bodies = batch_bodies(HOLD_QUEUE, small_depth - queued, options.batch_size);
        http.submit_all(bodies, options.clients).await?;
    }
    let claim_at_10k = claim_cost(store).await?;
    let stored = queued.max(small_depth);
    let target = options.large_items.max(stored);
    let bodies = batch_bodies(HOLD_QUEUE, target - stored, options.batch_size);
    let (ids, elapsed) = http.submit_all(bodies, options.clients).await?;
    let fill = Throughput::new(target - stored, elapsed);
    let claim_at_large = claim_cost(store).await?;
    let claim_ratio = if claim_at_10k.p50_ms > 0.0 {
        claim_at_large.p50_ms / claim_at_10k.p50_ms
    } else {
        0.0
    };

    // A batch in the middle of the queue: its pending items have real positions to count.
    let batch_id = ids.get(ids.len() / 2).context("no batch was stored")?.clone();
    let mut get_batch = Vec::with_capacity(options.status_calls);
    let mut get_items = Vec::with_capacity(options.status_calls);
    let budget = Instant::now() + STATUS_CALLS_BUDGET;
    for _ in 0..options.status_calls {
        if Instant::now() > budget {
            tracing::warn!(
                made = get_batch.len(),
                asked = options.status_calls,
                "the status calls took longer than {STATUS_CALLS_BUDGET:?}; stopping early"
            );
            break;
        }
        get_batch.push(http.timed_get(&format!("/v1/batches/{batch_id}")).await?);
        get_items.push(http.timed_get(&format!("/v1/batches/{batch_id}/items")).await?);
    }
    Ok(LargeReport {
        items_stored: target,
        fill,
        claim_at_10k,
        claim_at_large,
        claim_ratio,
        get_batch: Latency::of(get_batch),
        get_items_page: Latency::of(get_items),
    })
}

/// Times claims of 100 items at the head of the hold queue; each claim is handed back at
/// once (no attempt spent), so the depth stays the same.
async fn claim_cost(store: &dyn Store) -> anyhow::Result<Latency> {
    let request = ClaimRequest {
        queue: HOLD_QUEUE.to_owned(),
        max_items: CLAIM_SIZE,
        lease: Duration::from_secs(30),
        owner: "batchd-bench".to_owned(),
    };
    let mut samples = Vec::with_capacity(CLAIM_SAMPLES);
    for _ in 0..CLAIM_SAMPLES {
        let started = Instant::now();
        let claimed = store.claim(&request).await?;
        samples.push(started.elapsed());
        ensure!(
            claimed.len() == CLAIM_SIZE,
            "claimed {} of {CLAIM_SIZE} items",
            claimed.len()
        );
        // Completed, not handed back: each sample claims the next 100 items that never ran,
        // as claims do in operation. Handing them back made every sample claim the same
        // 100 items again, one by one, and time the churn of their rows.
        let done = claimed
            .into_iter()
            .map(|item| Finish {
                item_id: item.id,
                lease_token: item.lease_token,
                outcome: Outcome::Completed { result: Value::Null },
            })
            .collect();
        store.finish(done).await?;
    }
    Ok(Latency::of(samples))
}

fn cpu_model() -> Option<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    cpuinfo.lines().find_map(|line| {
        line.strip_prefix("model name")?
            .split_once(':')
            .map(|(_, v)| v.trim().to_owned())
    })
}

/// `VmHWM` of /proc/self/status: the peak resident set (Linux only).
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The report as a table for people.
pub fn render(report: &BenchReport) -> String {
    use std::fmt::Write as _;
    let m = &report.machine;
    let w = &report.workload;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "batchd {} bench on {} ({}), {} cores{}, {} build",
        m.batchd_version,
        m.backend.name(),
        m.database,
        m.cores,
        m.cpu.as_deref().map(|c| format!(" ({c})")).unwrap_or_default(),
        m.build
    );
    let _ = writeln!(
        out,
        "{} items in batches of {}, no-op handler concurrency {}, {} HTTP clients\n",
        w.items, w.batch_size, w.concurrency, w.clients
    );
    let rate = |t: &Throughput| {
        format!(
            "{:>10.0} items/s   ({} items in {:.3} s)",
            t.items_per_second, t.items, t.seconds
        )
    };
    let latency = |l: &Latency| {
        format!(
            "p50 {:>7.2} ms   p99 {:>7.2} ms   max {:>7.2} ms   ({} samples)",
            l.p50_ms, l.p99_ms, l.max_ms, l.samples
        )
    };
    let _ = writeln!(out, "{:<44} {}", "submit through HTTP", rate(&report.submit));
    let _ = writeln!(out, "{:<44} {}", "end to end, no-op items", rate(&report.end_to_end));
    let _ = writeln!(out, "{:<44} {}", "pick-up latency, idle queue", latency(&report.pickup));
    if let Some(large) = &report.large {
        let _ = writeln!(
            out,
            "{:<44} {}",
            format!("submit, filling to {} stored", large.items_stored),
            rate(&large.fill)
        );
        let _ = writeln!(
            out,
            "{:<44} {}",
            format!("claim {CLAIM_SIZE}, 10,000 queued"),
            latency(&large.claim_at_10k)
        );
        let _ = writeln!(
            out,
            "{:<44} {}   ratio {:.2}",
            format!("claim {CLAIM_SIZE}, {} queued", large.items_stored),
            latency(&large.claim_at_large),
            large.claim_ratio
        );
        let _ = writeln!(out, "{:<44} {}", "GET /v1/batches/{id}", latency(&large.get_batch));
        let _ = writeln!(
            out,
            "{:<44} {}",
            "GET /v1/batches/{id}/items",
            latency(&large.get_items_page)
        );
    }
    match report.peak_rss_bytes {
        Some(bytes) => {
            let _ = writeln!(out, "{:<44} {:>10.1} MB", "peak RSS", bytes as f64 / 1_048_576.0);
        }
        None => {
            let _ = writeln!(out, "{:<44} {:>10}", "peak RSS", "unknown");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let l = Latency::of(samples);
        assert_eq!((l.samples, l.p50_ms, l.p99_ms, l.max_ms), (100, 50.0, 99.0, 100.0));
        let l = Latency::of(vec![Duration::from_millis(7)]);
        assert_eq!((l.p50_ms, l.p99_ms), (7.0, 7.0));
        assert_eq!(Latency::of(Vec::new()).samples, 0);
    }

    #[test]
    fn bodies_hold_every_item_once_in_batches() {
        let bodies = batch_bodies("q", 2_500, 1_000);
        let sizes: Vec<usize> = bodies
            .iter()
            .map(|b| {
                let v: Value = serde_json::from_slice(b).expect("JSON");
                assert_eq!(v["queue"], "q");
                v["items"].as_array().expect("items").len()
            })
            .collect();
        assert_eq!(sizes, vec![1_000, 1_000, 500]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_short_run_on_sqlite_measures_every_phase() {
        let options = BenchOptions {
            items: 300,
            batch_size: 100,
            concurrency: 16,
            pickup_samples: 5,
            ..BenchOptions::default()
        };
        let report = run(options).await.expect("the bench runs");
        assert_eq!(report.submit.items, 300);
        assert_eq!(report.end_to_end.items, 300);
        assert!(report.submit.items_per_second > 0.0 && report.end_to_end.items_per_second > 0.0);
        assert_eq!(report.pickup.samples, 5);
        assert!(
            report.machine.database.starts_with("SQLite"),
            "{}",
            report.machine.database
        );
        let table = render(&report);
        assert!(table.contains("end to end, no-op items"), "{table}");
        assert!(table.contains("bench on sqlite (SQLite 3."), "{table}");
        let json = serde_json::to_value(&report).expect("the report serializes");
        assert_eq!(json["machine"]["backend"], "sqlite");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_short_run_on_postgres_measures_every_phase_and_drops_its_database() {
        let server = match std::env::var("BATCHD_TEST_DATABASE_URL") {
            Ok(url) if !url.is_empty() => url,
            _ if std::env::var_os("CI").is_some() => panic!("BATCHD_TEST_DATABASE_URL must be set under CI"),
            _ => return,
        };
        let options = BenchOptions {
            backend: BenchBackend::Postgres,
            database_url: Some(server.clone()),
            items: 200,
            batch_size: 50,
            concurrency: 16,
            pickup_samples: 3,
            ..BenchOptions::default()
        };
        let report = run(options).await.expect("the bench runs");
        assert_eq!(report.end_to_end.items, 200);
        assert!(
            report.machine.database.starts_with("PostgreSQL"),
            "{}",
            report.machine.database
        );
        assert_eq!(report.pickup.samples, 3);
        let databases = list_bench_databases(&server).await;
        let own = format!("batchd_bench_{}_", std::process::id());
        assert!(
            !databases.iter().any(|name| name.starts_with(&own)),
            "a bench database was left behind: {databases:?}"
        );
    }

    async fn list_bench_databases(url: &str) -> Vec<String> {
        use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
        #[derive(diesel::QueryableByName)]
        struct Name {
            #[diesel(sql_type = diesel::sql_types::Text)]
            datname: String,
        }
        let mut conn = AsyncPgConnection::establish(url).await.expect("PostgreSQL answers");
        let names: Vec<Name> = diesel::sql_query("SELECT datname FROM pg_database WHERE datname LIKE 'batchd_bench_%'")
            .load(&mut conn)
            .await
            .expect("the catalog answers");
        names.into_iter().map(|n| n.datname).collect()
    }
}

//! The `batchd` command line: `serve` (the default), `migrate`, `config check`, `worker`,
//! `bench`, and the client commands (`submit`, `status`, `events`, `cancel`, `pause`,
//! `resume`, `retry`, `queues`) that talk to a running server.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::bench::{self, BenchBackend, BenchOptions};
use crate::client_cli::{self, Control, ControlArgs, EventsArgs, NotCompleted, QueuesArgs, StatusArgs, SubmitArgs};
use crate::run::{self, check_open_mode, shutdown_signal, start};
use crate::settings::{Overrides, Settings};
use crate::telemetry::init_logging;
use crate::worker::{Stop, WorkerOptions, run_worker};

/// batchd: a server for asynchronous batch jobs.
#[derive(Debug, Parser)]
#[command(name = "batchd", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// With no subcommand, batchd serves.
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server (the default)
    Serve(ServeArgs),
    /// Apply pending database migrations and exit
    Migrate(MigrateArgs),
    /// Inspect the configuration
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Measure a server over a fresh database with a no-op handler
    Bench(BenchArgs),
    /// Claim items of a pull queue and run a command per item
    ///
    /// The command gets the item's input as JSON on stdin and its ids in BATCHD_* environment
    /// variables; its stdout (JSON, else text) is the result, each stderr line an item.log
    /// event; exit code 0 completes the item, any other fails the attempt.
    Worker(WorkerArgs),
    /// Submit a batch from a JSON or JSON Lines file
    Submit(SubmitArgs),
    /// Show a batch: status, progress and counts
    Status(StatusArgs),
    /// Print a batch's event timeline
    Events(EventsArgs),
    /// Cancel a batch
    Cancel(ControlArgs),
    /// Pause a batch: no new item starts
    Pause(ControlArgs),
    /// Resume a paused batch
    Resume(ControlArgs),
    /// Send a batch's failed items back to pending
    Retry(ControlArgs),
    /// List the queues: depth, running, throughput, oldest pending
    Queues(QueuesArgs),
}

#[derive(Debug, Args)]
struct WorkerArgs {
    /// The pull queue to claim from
    #[arg(long, value_name = "QUEUE")]
    queue: String,
    /// The batchd server
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:8080")]
    server: String,
    /// A worker (or admin) API key
    #[arg(long, value_name = "TOKEN", env = "BATCHD_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Items run at once
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    concurrency: u32,
    /// How long each claim waits for work (a long poll), up to 30000
    #[arg(long, value_name = "MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(0..=30000))]
    wait_ms: u64,
    /// The lease of each item (100-3600000); the queue's lease_ms by default
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    lease_ms: Option<u64>,
    /// The command and its arguments, after `--`
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate the settings and print them as TOML, secrets hidden
    Check(ConfigArgs),
}

#[derive(Debug, Args)]
struct ConfigArgs {
    /// A TOML file over the built-in defaults
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct ServeArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Listen on this address (server.bind)
    #[arg(long, value_name = "ADDR")]
    bind: Option<String>,
    /// The database to use (database.url)
    #[arg(long, value_name = "URL")]
    database_url: Option<String>,
}

#[derive(Debug, Args)]
struct MigrateArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// The database to migrate (database.url)
    #[arg(long, value_name = "URL")]
    database_url: Option<String>,
}

#[derive(Debug, Args)]
struct BenchArgs {
    /// The database to run on: a fresh SQLite file or a fresh PostgreSQL database
    #[arg(long, value_enum, default_value = "sqlite")]
    backend: BenchBackend,
    /// PostgreSQL: the server to create the fresh database on (default:
    /// BATCHD_TEST_DATABASE_URL, then DATABASE_URL, then postgres://postgres@127.0.0.1:5432/postgres)
    #[arg(long, value_name = "URL")]
    database_url: Option<String>,
    /// Items of the submit and end-to-end runs
    #[arg(long, default_value_t = 20_000)]
    items: usize,
    /// Items per submitted batch
    #[arg(long, default_value_t = 1_000)]
    batch_size: usize,
    /// Concurrency of the no-op queue (and executor.max_running)
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Submit requests in flight at once
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// One-item batches timed for the pick-up latency
    #[arg(long, default_value_t = 200)]
    pickup_samples: usize,
    /// Also time claims and status calls with 1,000,000 items stored (the slow part)
    #[arg(long)]
    large: bool,
    /// Items stored by --large
    #[arg(long, default_value_t = 1_000_000, requires = "large")]
    large_items: usize,
    /// Status calls of each kind timed by --large
    #[arg(long, default_value_t = 10_000, requires = "large")]
    status_calls: usize,
    /// Print one JSON object instead of the table
    #[arg(long)]
    json: bool,
}

/// Parses the command line and runs it; the binary's `main`.
pub fn run_cli() -> ExitCode {
    let cli = Cli::parse();
    match cli.run() {
        Ok(()) => ExitCode::SUCCESS,
        // The batch was printed already; the code says how it ended.
        Err(error) if error.is::<NotCompleted>() => ExitCode::from(2),
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

impl Cli {
    /// Runs the parsed command.
    pub fn run(self) -> anyhow::Result<()> {
        match self.command {
            None => serve(self.serve),
            Some(Command::Serve(args)) => serve(args),
            Some(Command::Migrate(args)) => migrate(args),
            Some(Command::Config(ConfigCommand::Check(args))) => config_check(&args),
            Some(Command::Bench(args)) => bench(args),
            Some(Command::Worker(args)) => worker(args),
            Some(Command::Submit(args)) => client(client_cli::submit(args)),
            Some(Command::Status(args)) => client(client_cli::status(args)),
            Some(Command::Events(args)) => client(client_cli::events(args)),
            Some(Command::Cancel(args)) => client(client_cli::control(Control::Cancel, args)),
            Some(Command::Pause(args)) => client(client_cli::control(Control::Pause, args)),
            Some(Command::Resume(args)) => client(client_cli::control(Control::Resume, args)),
            Some(Command::Retry(args)) => client(client_cli::control(Control::Retry, args)),
            Some(Command::Queues(args)) => client(client_cli::queues(args)),
        }
    }
}

/// The process environment, without the variables that are not UTF-8.
fn process_env() -> HashMap<String, String> {
    std::env::vars_os()
        .filter_map(|(key, value)| Some((key.into_string().ok()?, value.into_string().ok()?)))
        .collect()
}

fn load(config: Option<&Path>, overrides: &Overrides) -> anyhow::Result<Settings> {
    Ok(Settings::load(config, &process_env(), overrides)?)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let overrides = Overrides {
        bind: args.bind,
        database_url: args.database_url,
    };
    let settings = load(args.config.config.as_deref(), &overrides)?;
    init_logging(&settings.log)?;
    // Checked before binding: a refused server never listens.
    check_open_mode(&settings.auth, settings.server.bind)?;
    runtime()?.block_on(async move {
        let signal = shutdown_signal()?;
        let bind = settings.server.bind;
        let database = settings.database.url.redacted();
        let open = settings.auth.is_open();
        let listener = TcpListener::bind(bind).with_context(|| format!("cannot listen on {bind}"))?;
        let handle = start(settings, listener).await?;
        tracing::info!(
            bind = %handle.local_addr(),
            backend = handle.store().backend(),
            database = %database,
            "batchd is serving",
        );
        if open {
            tracing::warn!("no auth.keys or auth.jwt configured: serving open as tenant `local`");
        }
        handle.run_until(signal).await
    })
}

fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    let overrides = Overrides {
        bind: None,
        database_url: args.database_url,
    };
    let settings = load(args.config.config.as_deref(), &overrides)?;
    init_logging(&settings.log)?;
    runtime()?.block_on(async move {
        let store = run::open_store(&settings.database).await?;
        let applied = run::migrate(store.as_ref()).await?;
        println!(
            "applied {applied} migration{} to {} ({})",
            if applied == 1 { "" } else { "s" },
            settings.database.url,
            store.backend(),
        );
        Ok(())
    })
}

fn bench(args: BenchArgs) -> anyhow::Result<()> {
    // Warnings only, unless `BATCHD__LOG__LEVEL` asks for more (e.g. the executor's
    // `group commit` lines at debug).
    let mut log = Settings::defaults()?.log;
    log.level = std::env::var("BATCHD__LOG__LEVEL").unwrap_or_else(|_| "warn".to_owned());
    init_logging(&log)?;
    let options = BenchOptions {
        backend: args.backend,
        database_url: args.database_url,
        items: args.items,
        batch_size: args.batch_size,
        concurrency: args.concurrency,
        clients: args.clients,
        pickup_samples: args.pickup_samples,
        large: args.large,
        large_items: args.large_items,
        status_calls: args.status_calls,
    };
    // Interrupted, the run is dropped: its database and files go with it.
    let report = runtime()?.block_on(async move {
        let signal = shutdown_signal()?;
        tokio::select! {
            report = bench::run(options) => report,
            () = signal => anyhow::bail!("interrupted"),
        }
    })?;
    if args.json {
        println!("{}", serde_json::to_string(&report).context("cannot print the report")?);
    } else {
        print!("{}", bench::render(&report));
    }
    Ok(())
}

fn worker(args: WorkerArgs) -> anyhow::Result<()> {
    // Only the log settings apply (from the defaults and BATCHD__LOG__* variables).
    let settings = load(None, &Overrides::default())?;
    init_logging(&settings.log)?;
    let options = WorkerOptions {
        server: args.server,
        token: args.token.filter(|t| !t.is_empty()),
        queue: args.queue,
        concurrency: args.concurrency as usize,
        wait: Duration::from_millis(args.wait_ms),
        lease: args.lease_ms.map(Duration::from_millis),
        command: args.command,
    };
    runtime()?.block_on(async move {
        let stop = Stop {
            drain: CancellationToken::new(),
            kill: CancellationToken::new(),
        };
        let first = shutdown_signal()?;
        let signals = {
            let stop = stop.clone();
            tokio::spawn(async move {
                first.await;
                stop.drain.cancel();
                tracing::info!("stopping: no more claims; a second signal kills running commands");
                if let Ok(second) = shutdown_signal() {
                    second.await;
                    stop.kill.cancel();
                }
            })
        };
        let result = run_worker(options, stop).await;
        signals.abort();
        result
    })
}

/// Runs a client command: logs only as `BATCHD__LOG__*` asks (warnings by default), on a
/// runtime of its own.
fn client(command: impl Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    let mut log = load(None, &Overrides::default())?.log;
    if std::env::var_os("BATCHD__LOG__LEVEL").is_none() {
        log.level = "warn".to_owned();
    }
    init_logging(&log)?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(command)
}

fn config_check(args: &ConfigArgs) -> anyhow::Result<()> {
    let settings = load(args.config.as_deref(), &Overrides::default())?;
    check_open_mode(&settings.auth, settings.server.bind)?;
    print!("{}", settings.to_redacted_toml().context("cannot print the settings")?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn no_subcommand_means_serve_with_its_flags() {
        let cli = Cli::try_parse_from(["batchd", "--bind", "127.0.0.1:9"]).expect("parses");
        assert!(cli.command.is_none());
        assert_eq!(cli.serve.bind.as_deref(), Some("127.0.0.1:9"));
        let cli = Cli::try_parse_from(["batchd", "config", "check", "--config", "x.toml"]).expect("parses");
        assert!(matches!(
            cli.command,
            Some(Command::Config(ConfigCommand::Check(ConfigArgs { config: Some(_) })))
        ));
        assert!(Cli::try_parse_from(["batchd", "migrate", "--bind", "127.0.0.1:9"]).is_err());
    }

    #[test]
    fn worker_takes_a_queue_and_a_command_after_the_dashes() {
        let cli = Cli::try_parse_from([
            "batchd",
            "worker",
            "--queue",
            "q",
            "--concurrency",
            "4",
            "--",
            "sh",
            "-c",
            "cat",
        ])
        .expect("parses");
        let Some(Command::Worker(args)) = cli.command else {
            panic!("not the worker command");
        };
        assert_eq!((args.queue.as_str(), args.concurrency, args.wait_ms), ("q", 4, 5000));
        assert_eq!(args.server, "http://127.0.0.1:8080");
        assert_eq!(args.command, ["sh", "-c", "cat"]);
        assert!(
            Cli::try_parse_from(["batchd", "worker", "--queue", "q"]).is_err(),
            "a command is required"
        );
        assert!(Cli::try_parse_from(["batchd", "worker", "--queue", "q", "--concurrency", "0", "--", "x"]).is_err());
    }

    #[test]
    fn client_commands_take_an_id_or_a_file_and_the_server_flags() {
        let cli = Cli::try_parse_from([
            "batchd",
            "submit",
            "items.jsonl",
            "--queue",
            "emails",
            "--mode",
            "sequential",
            "--priority",
            "-3",
            "--watch",
            "--server",
            "http://127.0.0.1:9",
        ])
        .expect("parses");
        assert!(matches!(cli.command, Some(Command::Submit(_))));
        for command in ["status", "events", "cancel", "pause", "resume", "retry"] {
            assert!(
                Cli::try_parse_from(["batchd", command, "some-id", "--json", "--token", "t"]).is_ok(),
                "{command}"
            );
            assert!(
                Cli::try_parse_from(["batchd", command]).is_err(),
                "{command} needs an id"
            );
        }
        assert!(Cli::try_parse_from(["batchd", "events", "id", "--follow", "--after", "7"]).is_ok());
        assert!(Cli::try_parse_from(["batchd", "status", "id", "--follow"]).is_err());
        assert!(Cli::try_parse_from(["batchd", "submit", "f", "--mode", "sideways"]).is_err());
        assert!(Cli::try_parse_from(["batchd", "queues"]).is_ok());
    }
}

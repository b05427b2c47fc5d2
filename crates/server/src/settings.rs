//! batchd's settings, read in layers with the `config` crate, lowest first:
//!
//! 1. `config/default.toml`, compiled in: every key and its default live there and only
//!    there, so the file and the defaults cannot differ;
//! 2. the file given with `--config`;
//! 3. the environment: `BATCHD__SECTION__KEY` (`BATCHD__SERVER__BIND`,
//!    `BATCHD__QUEUES__EMAILS__CONCURRENCY`), then `DATABASE_URL` for `database.url`;
//! 4. command-line flags (`--bind`, `--database-url`).
//!
//! A queue that omits a key takes it from `[queue_defaults]`, never from another queue.
//! Everything is validated at start-up, and every problem is reported at once with the key
//! it is about (`auth.keys[1]: set either key or key_sha256, not both`).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use batchd_api::Role;
use batchd_domain::{JsonMap, is_valid_queue_name};
use config::{Config, Environment, File, FileFormat};
use serde::{Deserialize, Serialize};

use crate::secret::{DatabaseUrl, Secret};

/// The embedded defaults: the repository's `config/default.toml`.
pub const DEFAULT_TOML: &str = include_str!("../../../config/default.toml");

/// The prefix of the environment variables that set a key (`BATCHD__SERVER__BIND`).
const ENV_PREFIX: &str = "BATCHD";
/// Between the prefix, the section and the key; `__` so keys may contain `_`.
const ENV_SEPARATOR: &str = "__";
/// The conventional variable that overrides `database.url`.
const DATABASE_URL_ENV: &str = "DATABASE_URL";

/// Why the settings could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SettingsError {
    // The causes are in the messages rather than `#[source]`s: the config crate's errors are
    // the whole explanation, and a printed chain would repeat them.
    #[error("cannot read the config file {}: {error}", .path.display())]
    Read { path: PathBuf, error: std::io::Error },
    /// A file that is not TOML, or a value of the wrong type or an unknown key.
    #[error("{origin}: {error}")]
    Parse { origin: String, error: config::ConfigError },
    /// Values that parse but break a rule, each with its key.
    #[error("invalid settings:\n  {}", .0.join("\n  "))]
    Invalid(Vec<String>),
}

/// Values from the command line, the highest layer.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--bind`: `server.bind`.
    pub bind: Option<String>,
    /// `--database-url`: `database.url`.
    pub database_url: Option<String>,
}

/// Every setting of a batchd server, validated.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub server: ServerSettings,
    pub database: DatabaseSettings,
    pub auth: AuthSettings,
    pub webhooks: WebhookSettings,
    pub retention: RetentionSettings,
    pub executor: ExecutorSettings,
    pub log: LogSettings,
    /// What a queue takes for a key it omits.
    pub queue_defaults: QueueDefaults,
    /// The declared queues, with the omitted keys filled in from `queue_defaults`.
    pub queues: BTreeMap<String, QueueSettings>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    /// The address to listen on; without auth, loopback only.
    pub bind: SocketAddr,
    /// On SIGINT or SIGTERM, how long in-flight requests may take to finish.
    pub shutdown_grace_ms: u64,
    /// The largest request body.
    pub max_body_bytes: usize,
    /// `/v1` requests per second per caller; 0: no limit.
    pub requests_per_second: f64,
    /// Requests a caller may make at once above that rate.
    pub request_burst: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    /// `sqlite://file.db` (relative to the working directory), `sqlite:///abs/file.db`, or
    /// `postgres://user:password@host/db`.
    pub url: DatabaseUrl,
    /// Pool size (PostgreSQL) or readers beside the one writer (SQLite).
    pub max_connections: usize,
    /// Apply pending migrations at start-up; if false, `batchd migrate` must have run.
    pub migrate_on_start: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct AuthSettings {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<AuthKey>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt: Option<JwtSettings>,
}

impl AuthSettings {
    /// No keys and no JWT: the server runs open as tenant `local`, on loopback only.
    pub fn is_open(&self) -> bool {
        self.keys.is_empty() && self.jwt.is_none()
    }
}

/// One API key (`[[auth.keys]]`); exactly one of `key` and `key_sha256` is set.
#[derive(Debug, Clone, Serialize)]
pub struct AuthKey {
    pub name: String,
    pub tenant: String,
    pub role: Role,
    /// The hex SHA-256 of the key (production).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_sha256: Option<Secret>,
    /// The key itself (development).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<Secret>,
    /// Worker keys only: the pull queues the key may claim from; absent means all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queues: Option<Vec<String>>,
}

/// HS256 JWTs (`[auth.jwt]`): the tenant is the `sub` claim; audience and expiry are checked.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtSettings {
    pub hs256_secret: Secret,
    /// The `aud` a token must carry; Supabase's `authenticated` unless set.
    #[serde(default = "default_jwt_audience")]
    pub audience: String,
}

fn default_jwt_audience() -> String {
    "authenticated".to_owned()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    pub allow_private_destinations: bool,
    pub max_attempts: u32,
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionSettings {
    /// Days a finished batch is kept; 0 keeps it forever.
    pub finished_batch_days: u32,
}

/// `[executor]`: the in-process worker pool of this server.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecutorSettings {
    /// Items running at once on this server, all queues together.
    pub max_running: u32,
    /// The fallback poll for work; wake-ups come by notification.
    pub poll_interval_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    /// A tracing filter: `info`, `debug`, `batchd=debug,actix_web=warn`.
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One readable line per event.
    Human,
    /// One JSON object per line, for log collectors.
    Json,
}

/// The per-queue keys with a server-wide default (`[queue_defaults]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueDefaults {
    pub concurrency: u32,
    /// Items started per second; 0 means no limit.
    pub rate_per_second: f64,
    pub burst: u32,
    pub timeout_ms: u64,
    pub max_attempts: u32,
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    pub max_items: u32,
    pub lease_ms: u64,
}

/// A queue as written in the config: what it omits comes from `[queue_defaults]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct QueueConfig {
    handler: Option<String>,
    concurrency: Option<u32>,
    rate_per_second: Option<f64>,
    burst: Option<u32>,
    timeout_ms: Option<u64>,
    max_attempts: Option<u32>,
    backoff_base_ms: Option<u64>,
    backoff_max_ms: Option<u64>,
    max_items: Option<u32>,
    lease_ms: Option<u64>,
    url: Option<String>,
    secret: Option<Secret>,
    #[serde(default)]
    defaults: JsonMap,
}

/// A declared queue (`[queues.<name>]`), every key resolved.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueueSettings {
    /// `demo`, `http`, `pull`, or a name an embedder registered.
    pub handler: String,
    pub concurrency: u32,
    pub rate_per_second: f64,
    pub burst: u32,
    pub timeout_ms: u64,
    pub max_attempts: u32,
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    pub max_items: u32,
    pub lease_ms: u64,
    /// `http` handler: where items are pushed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// `http` handler: signs the pushed requests.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<Secret>,
    /// Queue-level config defaults for its items.
    pub defaults: JsonMap,
}

impl QueueSettings {
    /// A queue as `[queues.<name>]` with no keys of its own: the `demo` handler and every
    /// other value from `[queue_defaults]`.
    pub fn from_defaults(defaults: &QueueDefaults) -> Self {
        Self {
            handler: "demo".to_owned(),
            concurrency: defaults.concurrency,
            rate_per_second: defaults.rate_per_second,
            burst: defaults.burst,
            timeout_ms: defaults.timeout_ms,
            max_attempts: defaults.max_attempts,
            backoff_base_ms: defaults.backoff_base_ms,
            backoff_max_ms: defaults.backoff_max_ms,
            max_items: defaults.max_items,
            lease_ms: defaults.lease_ms,
            url: None,
            secret: None,
            defaults: JsonMap::new(),
        }
    }
}

/// `[auth]` as written: roles are checked with the other rules, so that a wrong one is
/// reported with its key like every other problem.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthConfig {
    #[serde(default)]
    keys: Vec<AuthKeyConfig>,
    jwt: Option<JwtSettings>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthKeyConfig {
    name: String,
    tenant: String,
    role: String,
    key_sha256: Option<Secret>,
    key: Option<Secret>,
    queues: Option<Vec<String>>,
}

/// The file's shape before queues are resolved and rules checked.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    server: ServerSettings,
    database: DatabaseSettings,
    #[serde(default)]
    auth: AuthConfig,
    webhooks: WebhookSettings,
    retention: RetentionSettings,
    executor: ExecutorSettings,
    log: LogSettings,
    queue_defaults: QueueDefaults,
    #[serde(default)]
    queues: BTreeMap<String, QueueConfig>,
}

impl Settings {
    /// The embedded defaults alone.
    pub fn defaults() -> Result<Settings, SettingsError> {
        Settings::load(None, &HashMap::new(), &Overrides::default())
    }

    /// Loads the layers: defaults < `file` < `env` < `overrides`. `env` is the process
    /// environment in production; tests pass their own map.
    pub fn load(
        file: Option<&Path>,
        env: &HashMap<String, String>,
        overrides: &Overrides,
    ) -> Result<Settings, SettingsError> {
        let parse_error = |origin: &str| {
            let origin = origin.to_owned();
            move |error| SettingsError::Parse { origin, error }
        };
        let mut builder = Config::builder().add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml));
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|error| SettingsError::Read {
                path: path.to_owned(),
                error,
            })?;
            // Parsed here so that a syntax error names the file.
            Config::builder()
                .add_source(File::from_str(&text, FileFormat::Toml))
                .build()
                .map_err(parse_error(&path.display().to_string()))?;
            builder = builder.add_source(File::from_str(&text, FileFormat::Toml));
        }
        let batchd_env: config::Map<String, String> = env
            .iter()
            .filter(|(key, _)| key.starts_with(&format!("{ENV_PREFIX}{ENV_SEPARATOR}")))
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        builder = builder.add_source(
            Environment::with_prefix(ENV_PREFIX)
                .prefix_separator(ENV_SEPARATOR)
                .separator(ENV_SEPARATOR)
                .try_parsing(true)
                .source(Some(batchd_env)),
        );
        let env_database_url = env.get(DATABASE_URL_ENV).filter(|url| !url.is_empty()).cloned();
        let database_url = overrides.database_url.clone().or(env_database_url);
        let layered = builder
            .set_override_option("database.url", database_url)
            .and_then(|builder| builder.set_override_option("server.bind", overrides.bind.clone()))
            .and_then(|builder| builder.build())
            .map_err(parse_error("invalid settings"))?;
        let raw: RawSettings = layered.try_deserialize().map_err(parse_error("invalid settings"))?;
        Settings::resolve(raw)
    }

    /// The settings as TOML, secrets shown as `***` and the database URL without its
    /// password: what `batchd config check` prints.
    pub fn to_redacted_toml(&self) -> Result<String, toml::ser::Error> {
        toml::to_string_pretty(self)
    }

    /// Fills in the queues and checks every rule, collecting all problems.
    fn resolve(raw: RawSettings) -> Result<Settings, SettingsError> {
        let mut problems = Vec::new();
        check_server(&raw.server, &mut problems);
        check_executor(&raw.executor, &mut problems);
        check_database(&raw.database, &mut problems);
        let auth = resolve_auth(raw.auth, &mut problems);
        check_webhooks(&raw.webhooks, &mut problems);
        if let Err(error) = tracing_subscriber::EnvFilter::try_new(&raw.log.level) {
            problems.push(format!(
                "log.level: `{}` is not a tracing filter: {error}",
                raw.log.level
            ));
        }
        check_queue_limits("queue_defaults", &QueueLimits::from(&raw.queue_defaults), &mut problems);
        if raw.queue_defaults.backoff_base_ms > raw.queue_defaults.backoff_max_ms {
            problems.push(format!(
                "queue_defaults.backoff_base_ms: {} is more than queue_defaults.backoff_max_ms ({})",
                raw.queue_defaults.backoff_base_ms, raw.queue_defaults.backoff_max_ms
            ));
        }
        let queues = raw
            .queues
            .into_iter()
            .map(|(name, queue)| {
                let resolved = resolve_queue(&name, queue, &raw.queue_defaults, &mut problems);
                (name, resolved)
            })
            .collect();
        if !problems.is_empty() {
            return Err(SettingsError::Invalid(problems));
        }
        Ok(Settings {
            server: raw.server,
            database: raw.database,
            auth,
            webhooks: raw.webhooks,
            retention: raw.retention,
            executor: raw.executor,
            log: raw.log,
            queue_defaults: raw.queue_defaults,
            queues,
        })
    }
}

fn check_server(server: &ServerSettings, problems: &mut Vec<String>) {
    if server.max_body_bytes == 0 {
        problems.push("server.max_body_bytes: must be at least 1".to_owned());
    }
    if !(server.requests_per_second >= 0.0 && server.requests_per_second.is_finite()) {
        problems.push("server.requests_per_second: must be 0 (no limit) or more".to_owned());
    }
}

fn check_executor(executor: &ExecutorSettings, problems: &mut Vec<String>) {
    if executor.max_running == 0 {
        problems.push("executor.max_running: must be at least 1".to_owned());
    }
    if executor.poll_interval_ms < 10 {
        problems.push("executor.poll_interval_ms: must be at least 10".to_owned());
    }
}

fn check_database(database: &DatabaseSettings, problems: &mut Vec<String>) {
    let url = database.url.expose();
    let known = ["sqlite://", "postgres://", "postgresql://"];
    if !known.iter().any(|scheme| url.starts_with(scheme)) {
        problems.push(format!(
            "database.url: `{}` must start with sqlite://, postgres:// or postgresql://",
            database.url
        ));
    }
    if database.max_connections == 0 {
        problems.push("database.max_connections: must be at least 1".to_owned());
    }
}

fn resolve_auth(auth: AuthConfig, problems: &mut Vec<String>) -> AuthSettings {
    let mut names = HashMap::new();
    let mut keys = Vec::with_capacity(auth.keys.len());
    for (index, key) in auth.keys.into_iter().enumerate() {
        let path = format!("auth.keys[{index}]");
        if key.name.trim().is_empty() {
            problems.push(format!("{path}.name: must not be empty"));
        } else if let Some(first) = names.insert(key.name.clone(), index) {
            problems.push(format!(
                "{path}.name: `{}` is already the name of auth.keys[{first}]",
                key.name
            ));
        }
        if key.tenant.trim().is_empty() {
            problems.push(format!("{path}.tenant: must not be empty"));
        }
        match (&key.key, &key.key_sha256) {
            (Some(_), Some(_)) => {
                problems.push(format!("{path}: set either key or key_sha256, not both"));
            }
            (None, None) => problems.push(format!("{path}: set key or key_sha256")),
            (Some(plain), None) if plain.expose().is_empty() => {
                problems.push(format!("{path}.key: must not be empty"));
            }
            (None, Some(hash)) if !is_sha256_hex(hash.expose()) => problems.push(format!(
                "{path}.key_sha256: must be 64 hexadecimal digits (the SHA-256 of the key)"
            )),
            _ => {}
        }
        let role = match key.role.parse::<Role>() {
            Ok(role) => role,
            Err(error) => {
                problems.push(format!("{path}.role: {error}"));
                continue;
            }
        };
        if let Some(queues) = &key.queues {
            if role != Role::Worker {
                problems.push(format!(
                    "{path}.queues: only worker keys take queues (this key's role is {role})"
                ));
            }
            for (i, queue) in queues.iter().enumerate() {
                if !is_valid_queue_name(queue) {
                    problems.push(format!("{path}.queues[{i}]: `{queue}` is not a valid queue name"));
                }
            }
        }
        keys.push(AuthKey {
            name: key.name,
            tenant: key.tenant,
            role,
            key_sha256: key.key_sha256,
            key: key.key,
            queues: key.queues,
        });
    }
    if let Some(jwt) = &auth.jwt {
        if jwt.hs256_secret.expose().is_empty() {
            problems.push("auth.jwt.hs256_secret: must not be empty".to_owned());
        }
        if jwt.audience.is_empty() {
            problems.push("auth.jwt.audience: must not be empty".to_owned());
        }
    }
    AuthSettings { keys, jwt: auth.jwt }
}

fn is_sha256_hex(value: &str) -> bool {
    value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit())
}

fn check_webhooks(webhooks: &WebhookSettings, problems: &mut Vec<String>) {
    if webhooks.max_attempts == 0 {
        problems.push("webhooks.max_attempts: must be at least 1".to_owned());
    }
    if webhooks.timeout_ms == 0 {
        problems.push("webhooks.timeout_ms: must be at least 1".to_owned());
    }
    if webhooks.backoff_base_ms > webhooks.backoff_max_ms {
        problems.push(format!(
            "webhooks.backoff_base_ms: {} is more than webhooks.backoff_max_ms ({})",
            webhooks.backoff_base_ms, webhooks.backoff_max_ms
        ));
    }
}

/// The limit keys of a queue, each `None` where the queue leaves it to `[queue_defaults]`,
/// so a problem is reported once, under the key where the value was written.
#[derive(Default)]
struct QueueLimits {
    concurrency: Option<u32>,
    rate_per_second: Option<f64>,
    burst: Option<u32>,
    timeout_ms: Option<u64>,
    max_attempts: Option<u32>,
    max_items: Option<u32>,
    lease_ms: Option<u64>,
}

impl From<&QueueDefaults> for QueueLimits {
    fn from(d: &QueueDefaults) -> Self {
        QueueLimits {
            concurrency: Some(d.concurrency),
            rate_per_second: Some(d.rate_per_second),
            burst: Some(d.burst),
            timeout_ms: Some(d.timeout_ms),
            max_attempts: Some(d.max_attempts),
            max_items: Some(d.max_items),
            lease_ms: Some(d.lease_ms),
        }
    }
}

fn check_queue_limits(path: &str, limits: &QueueLimits, problems: &mut Vec<String>) {
    let positive = [
        ("concurrency", limits.concurrency.map(u64::from)),
        ("burst", limits.burst.map(u64::from)),
        ("timeout_ms", limits.timeout_ms),
        ("max_attempts", limits.max_attempts.map(u64::from)),
        ("max_items", limits.max_items.map(u64::from)),
        ("lease_ms", limits.lease_ms),
    ];
    for (key, value) in positive {
        if value == Some(0) {
            problems.push(format!("{path}.{key}: must be at least 1"));
        }
    }
    if let Some(rate) = limits.rate_per_second {
        if !rate.is_finite() || rate < 0.0 {
            problems.push(format!("{path}.rate_per_second: must be 0 (no limit) or more"));
        }
    }
}

fn resolve_queue(
    name: &str,
    queue: QueueConfig,
    defaults: &QueueDefaults,
    problems: &mut Vec<String>,
) -> QueueSettings {
    let path = format!("queues.{name}");
    if !is_valid_queue_name(name) {
        problems.push(format!(
            "{path}: `{name}` is not a valid queue name (1-64 of A-Z a-z 0-9 . _ -)"
        ));
    }
    let explicit = QueueLimits {
        concurrency: queue.concurrency,
        rate_per_second: queue.rate_per_second,
        burst: queue.burst,
        timeout_ms: queue.timeout_ms,
        max_attempts: queue.max_attempts,
        max_items: queue.max_items,
        lease_ms: queue.lease_ms,
    };
    let sets_backoff = queue.backoff_base_ms.is_some() || queue.backoff_max_ms.is_some();
    check_queue_limits(&path, &explicit, problems);
    let handler = queue.handler.unwrap_or_default();
    if handler.trim().is_empty() {
        problems.push(format!(
            "{path}.handler: required (demo, http, pull, or a registered handler)"
        ));
    }
    if handler == "http" {
        match &queue.url {
            None => problems.push(format!("{path}.url: required by the http handler")),
            Some(url) if !(url.starts_with("http://") || url.starts_with("https://")) => {
                problems.push(format!("{path}.url: `{url}` must start with http:// or https://"));
            }
            Some(_) => {}
        }
    }
    if let Some(secret) = &queue.secret
        && let Err(error) = batchd_webhook::Secret::new(secret.expose())
    {
        problems.push(format!("{path}.secret: {error}"));
    }
    let resolved = QueueSettings {
        handler,
        concurrency: queue.concurrency.unwrap_or(defaults.concurrency),
        rate_per_second: queue.rate_per_second.unwrap_or(defaults.rate_per_second),
        burst: queue.burst.unwrap_or(defaults.burst),
        timeout_ms: queue.timeout_ms.unwrap_or(defaults.timeout_ms),
        max_attempts: queue.max_attempts.unwrap_or(defaults.max_attempts),
        backoff_base_ms: queue.backoff_base_ms.unwrap_or(defaults.backoff_base_ms),
        backoff_max_ms: queue.backoff_max_ms.unwrap_or(defaults.backoff_max_ms),
        max_items: queue.max_items.unwrap_or(defaults.max_items),
        lease_ms: queue.lease_ms.unwrap_or(defaults.lease_ms),
        url: queue.url,
        secret: queue.secret,
        defaults: queue.defaults,
    };
    // Checked on the resolved values (a queue may raise its base above the default max), and
    // only for a queue that sets one of the two: `[queue_defaults]` reports its own.
    if sets_backoff && resolved.backoff_base_ms > resolved.backoff_max_ms {
        problems.push(format!(
            "{path}.backoff_base_ms: {} is more than backoff_max_ms ({})",
            resolved.backoff_base_ms, resolved.backoff_max_ms
        ));
    }
    resolved
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    /// A config file in a temp dir; the dir goes with the value.
    struct ConfigFile {
        dir: tempfile::TempDir,
    }

    impl ConfigFile {
        fn new(text: &str) -> Self {
            let dir = tempfile::tempdir().expect("a temp dir");
            let mut file = std::fs::File::create(dir.path().join("batchd.toml")).expect("a config file");
            file.write_all(text.as_bytes()).expect("the config is written");
            Self { dir }
        }

        fn path(&self) -> PathBuf {
            self.dir.path().join("batchd.toml")
        }
    }

    fn load(text: &str, env_pairs: &[(&str, &str)], overrides: &Overrides) -> Result<Settings, SettingsError> {
        let file = ConfigFile::new(text);
        Settings::load(Some(&file.path()), &env(env_pairs), overrides)
    }

    fn problems(result: Result<Settings, SettingsError>) -> String {
        result.expect_err("the settings are refused").to_string()
    }

    #[test]
    fn the_defaults_are_the_documented_ones() {
        let s = Settings::defaults().expect("the embedded defaults are valid");
        assert_eq!(s.server.bind, "127.0.0.1:8080".parse().expect("an address"));
        assert_eq!(s.server.shutdown_grace_ms, 30_000);
        assert_eq!(s.server.max_body_bytes, 33_554_432);
        assert_eq!(s.database.url.expose(), "sqlite://batchd.db");
        assert_eq!(s.database.max_connections, 8);
        assert!(s.database.migrate_on_start);
        assert!(s.auth.is_open());
        assert!(!s.webhooks.allow_private_destinations);
        assert_eq!(s.webhooks.max_attempts, 12);
        assert_eq!(s.retention.finished_batch_days, 30);
        assert_eq!(s.log.format, LogFormat::Human);
        assert_eq!(s.log.level, "info");
        let default = &s.queues["default"];
        assert_eq!(default.handler, "demo");
        assert_eq!(default.concurrency, 8);
        assert_eq!(default.timeout_ms, 180_000);
        assert_eq!(default.lease_ms, 30_000);
        assert_eq!(s.queues.len(), 1);
    }

    #[test]
    fn file_then_env_then_flags() {
        let file = "[server]\nbind = \"127.0.0.1:1001\"\nshutdown_grace_ms = 5\n";
        let s = load(file, &[], &Overrides::default()).expect("valid");
        assert_eq!(s.server.bind.port(), 1001);
        assert_eq!(s.server.shutdown_grace_ms, 5);
        assert_eq!(
            s.server.max_body_bytes, 33_554_432,
            "keys the file omits keep their default"
        );

        let vars = [
            ("BATCHD__SERVER__BIND", "127.0.0.1:1002"),
            ("BATCHD__SERVER__SHUTDOWN_GRACE_MS", "7"),
        ];
        let s = load(file, &vars, &Overrides::default()).expect("valid");
        assert_eq!(s.server.bind.port(), 1002);
        assert_eq!(s.server.shutdown_grace_ms, 7);

        let flags = Overrides {
            bind: Some("127.0.0.1:1003".to_owned()),
            database_url: None,
        };
        let s = load(file, &vars, &flags).expect("valid");
        assert_eq!(s.server.bind.port(), 1003);
        assert_eq!(s.server.shutdown_grace_ms, 7);
    }

    #[test]
    fn database_url_overrides_file_and_prefixed_env_but_not_the_flag() {
        let file = "[database]\nurl = \"sqlite://from-file.db\"\n";
        let s = load(file, &[], &Overrides::default()).expect("valid");
        assert_eq!(s.database.url.expose(), "sqlite://from-file.db");

        let vars = [("BATCHD__DATABASE__URL", "sqlite://from-prefixed.db")];
        let s = load(file, &vars, &Overrides::default()).expect("valid");
        assert_eq!(s.database.url.expose(), "sqlite://from-prefixed.db");

        let vars = [
            ("BATCHD__DATABASE__URL", "sqlite://from-prefixed.db"),
            ("DATABASE_URL", "postgres://app:pw@db/batchd"),
        ];
        let s = load(file, &vars, &Overrides::default()).expect("valid");
        assert_eq!(s.database.url.expose(), "postgres://app:pw@db/batchd");

        let flags = Overrides {
            bind: None,
            database_url: Some("sqlite:///srv/flag.db".to_owned()),
        };
        let s = load(file, &vars, &flags).expect("valid");
        assert_eq!(s.database.url.expose(), "sqlite:///srv/flag.db");
    }

    #[test]
    fn a_queue_takes_omitted_keys_from_queue_defaults_not_from_the_default_queue() {
        let file = r#"
            [queue_defaults]
            max_attempts = 5

            [queues.default]
            concurrency = 2
            timeout_ms = 1000

            [queues.emails]
            handler = "demo"
            concurrency = 1
        "#;
        let s = load(file, &[], &Overrides::default()).expect("valid");
        let default = &s.queues["default"];
        assert_eq!(default.handler, "demo", "the default queue keeps its handler");
        assert_eq!(
            (default.concurrency, default.timeout_ms, default.max_attempts),
            (2, 1000, 5)
        );
        let emails = &s.queues["emails"];
        assert_eq!(emails.concurrency, 1);
        assert_eq!(
            emails.timeout_ms, 180_000,
            "the server default, not the default queue's 1000"
        );
        assert_eq!(emails.max_attempts, 5);
        assert_eq!(emails.lease_ms, 30_000);
    }

    #[test]
    fn queues_can_be_set_from_the_environment() {
        let vars = [
            ("BATCHD__QUEUES__DEFAULT__CONCURRENCY", "3"),
            ("BATCHD__QUEUE_DEFAULTS__LEASE_MS", "999"),
        ];
        let s = Settings::load(None, &env(&vars), &Overrides::default()).expect("valid");
        assert_eq!(s.queues["default"].concurrency, 3);
        assert_eq!(s.queues["default"].lease_ms, 999);
    }

    #[test]
    fn a_plain_key_and_its_hash_together_are_refused_by_path() {
        let file = r#"
            [[auth.keys]]
            name = "web"
            tenant = "acme"
            role = "client"
            key = "dev-key"

            [[auth.keys]]
            name = "worker"
            tenant = "acme"
            role = "worker"
            key = "k2"
            key_sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
        "#;
        let message = problems(load(file, &[], &Overrides::default()));
        assert!(
            message.contains("auth.keys[1]: set either key or key_sha256, not both"),
            "{message}"
        );
        assert!(!message.contains("auth.keys[0]"), "{message}");
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let file = r#"
            [database]
            url = "mysql://db/batchd"

            [[auth.keys]]
            name = "web"
            tenant = ""
            role = "client"
            key_sha256 = "abc"
            queues = ["x"]

            [webhooks]
            backoff_base_ms = 10
            backoff_max_ms = 1

            [queues.push]
            handler = "http"
            concurrency = 0

            [queues."bad name"]
            handler = "demo"

            [queues.signed]
            handler = "http"
            url = "http://127.0.0.1:9/work"
            secret = "whsec_!!!"

            [log]
            level = "info,=="
        "#;
        let message = problems(load(file, &[], &Overrides::default()));
        for expected in [
            "database.url:",
            "auth.keys[0].tenant: must not be empty",
            "auth.keys[0].key_sha256: must be 64 hexadecimal digits",
            "auth.keys[0].queues: only worker keys take queues",
            "webhooks.backoff_base_ms:",
            "queues.push.url: required by the http handler",
            "queues.push.concurrency: must be at least 1",
            "queues.bad name:",
            "queues.signed.secret:",
            "log.level:",
        ] {
            assert!(message.contains(expected), "missing {expected:?} in:\n{message}");
        }
    }

    #[test]
    fn type_errors_and_unknown_keys_name_the_key() {
        let message = problems(load("[server]\nbind = \"localhost\"\n", &[], &Overrides::default()));
        assert!(message.contains("server.bind"), "{message}");
        let flags = Overrides {
            bind: Some("nowhere".to_owned()),
            database_url: None,
        };
        let message = problems(Settings::load(None, &HashMap::new(), &flags));
        assert!(message.contains("server.bind"), "{message}");
        let message = problems(load("[server]\nbnd = \"127.0.0.1:1\"\n", &[], &Overrides::default()));
        assert!(message.contains("bnd"), "{message}");
        let file = "[[auth.keys]]\nname = \"a\"\ntenant = \"t\"\nrole = \"owner\"\nkey = \"k\"\n";
        let message = problems(load(file, &[], &Overrides::default()));
        assert!(
            message.contains("auth.keys[0].role: invalid role `owner`: expected one of client, worker, admin"),
            "{message}"
        );
        let message = problems(load("[server\n", &[], &Overrides::default()));
        assert!(
            message.contains("batchd.toml"),
            "a syntax error names the file: {message}"
        );
    }

    #[test]
    fn secrets_are_hidden_from_debug_and_from_the_printed_settings() {
        let file = r#"
            [database]
            url = "postgres://batchd:db-password@db/batchd"

            [[auth.keys]]
            name = "dev"
            tenant = "acme"
            role = "admin"
            key = "plain-key-value"

            [auth.jwt]
            hs256_secret = "jwt-secret-value"

            [queues.push]
            handler = "http"
            url = "http://127.0.0.1:9000/work"
            secret = "queue-secret-value"
        "#;
        let s = load(file, &[], &Overrides::default()).expect("valid");
        assert!(!s.auth.is_open());
        assert_eq!(
            s.auth.jwt.as_ref().map(|jwt| jwt.audience.as_str()),
            Some("authenticated")
        );
        let shown = [format!("{s:?}"), s.to_redacted_toml().expect("the settings serialize")];
        for text in shown {
            for secret in [
                "db-password",
                "plain-key-value",
                "jwt-secret-value",
                "queue-secret-value",
            ] {
                assert!(!text.contains(secret), "{secret} leaked:\n{text}");
            }
            assert!(text.contains("***"), "{text}");
        }
    }

    #[test]
    fn the_printed_settings_load_back() {
        let s = Settings::defaults().expect("valid");
        let printed = s.to_redacted_toml().expect("the settings serialize");
        let again = load(&printed, &[], &Overrides::default()).expect("the printed settings are valid");
        assert_eq!(again.queues, s.queues);
        assert_eq!(again.server.bind, s.server.bind);
    }
}

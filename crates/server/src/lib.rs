#![doc = include_str!("../README.md")]

pub mod bench;
mod cli;
mod client_cli;
mod run;
mod secret;
mod settings;
mod telemetry;
mod worker;

pub use cli::{Cli, run_cli};
pub use run::{
    ServerHandle, api_config, check_open_mode, dispatcher_config, executor_config, migrate, open_store,
    queue_config_defaults, register_http_handlers, serve, shutdown_signal, start, start_with,
};
pub use secret::{DatabaseUrl, Secret};
pub use settings::{
    AuthKey, AuthSettings, DEFAULT_TOML, DatabaseSettings, ExecutorSettings, JwtSettings, LogFormat, LogSettings,
    Overrides, QueueDefaults, QueueSettings, RetentionSettings, ServerSettings, Settings, SettingsError,
    WebhookSettings,
};
pub use telemetry::init_logging;

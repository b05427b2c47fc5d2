//! Logging: tracing-subscriber to stderr (stdout is kept for command output such as
//! `batchd config check`), human-readable or one JSON object per line, filtered by
//! `log.level`.

use std::io::IsTerminal;

use anyhow::Context;
use tracing_subscriber::EnvFilter;

use crate::settings::{LogFormat, LogSettings};

/// Installs the global subscriber; call once, before anything logs.
pub fn init_logging(log: &LogSettings) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(&log.level)
        .with_context(|| format!("log.level: `{}` is not a tracing filter", log.level))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, never into a file or a collector.
        .with_ansi(std::io::stderr().is_terminal());
    let installed = match log.format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    installed.map_err(|error| anyhow::anyhow!("cannot install the logger: {error}"))
}

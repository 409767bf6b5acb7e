//! Tracing set-up shared by both services.
//!
//! [`LogArgs`] are the two logging flags both services take: `RUST_LOG`
//! (the filter, whose default each service sets) and `--log-format json`,
//! one JSON object per line for log shippers.

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (the default).
    #[default]
    Text,
    /// One JSON object per line, with span fields.
    Json,
}

/// How a service logs.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log line format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    /// Log filter, in tracing's EnvFilter syntax.
    #[arg(long, env = "RUST_LOG", global = true)]
    pub log_filter: String,
}

impl LogArgs {
    /// Installs the global subscriber these flags describe (see [`init`]).
    pub fn init(&self) {
        init(self.log_format, &self.log_filter);
    }
}

/// Installs the global subscriber. Safe to call more than once: later calls
/// are ignored, which tests rely on.
pub fn init(format: LogFormat, filter: &str) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match format {
        LogFormat::Text => registry.with(fmt::layer().with_target(true)).try_init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(false),
            )
            .try_init(),
    };
}

/// Test logging: silent unless `TEST_LOG` is set, then filtered by `RUST_LOG`.
pub fn init_for_tests() {
    if std::env::var_os("TEST_LOG").is_some() {
        let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "info,sqlx=warn".into());
        init(LogFormat::Text, &filter);
    }
}

//! The settings both services read with the same meaning, as one clap
//! [`Args`] struct that each service flattens into its own `Settings`, next
//! to [`ServerArgs`](crate::server::ServerArgs). Their environment variables
//! carry no prefix; `MEMORY_` and `BOOKING_` name a service's own settings.
//! `--help` lists them all, and README.md's Configuration tables (kept true
//! by a test) explain them.
//!
//! The few defaults that differ between the services (ports, pool size, log
//! filter) are stated once per service in [`ServiceDefaults`] and applied to
//! the service's command line, so `--help` shows each service its own.

mod renamed;

use std::{net::SocketAddr, time::Duration};

use clap::Args;

pub use renamed::{RenamedVariables, RenamedVariablesSet};

use crate::{
    db::{PoolSettings, Pooler},
    server::AdminAddr,
    telemetry::LogArgs,
};

/// Where a service listens, how it uses its database, how it stops and logs.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// Address the gRPC server listens on.
    #[arg(long, env = "GRPC_ADDR", global = true)]
    pub grpc_addr: SocketAddr,

    /// Address of the admin HTTP server (Prometheus `/metrics`, `/healthz`); `off` disables it.
    #[arg(long, env = "ADMIN_ADDR", global = true)]
    pub admin_addr: AdminAddr,

    /// PostgreSQL URL of the service's database (created if missing); each service owns its schemas.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/maitre",
        hide_env_values = true,
        global = true
    )]
    pub database_url: String,

    /// PostgreSQL URL straight to the server, not through a pooler: migrations (sqlx's session advisory lock) and booking-service's LISTEN for job wake-ups use it. Unset: DATABASE_URL. Required with DB_POOLER=transaction.
    #[arg(
        long,
        env = "DATABASE_DIRECT_URL",
        hide_env_values = true,
        global = true
    )]
    pub database_direct_url: Option<String>,

    /// What DATABASE_URL reaches: `none` = PostgreSQL itself (or a session-mode pooler); `transaction` = a transaction-mode pooler such as PgBouncer with pool_mode=transaction. With `transaction` no named prepared statement is kept on the server (each statement is parsed in the same round trip as its execution; descriptions are cached), no `options` or `extra_float_digits` startup parameter is sent (PgBouncer refuses them), so DB_STATEMENT_TIMEOUT must be set on the server for the role (ALTER ROLE ... SET statement_timeout; a WARN says when it differs); DATABASE_DIRECT_URL is then required.
    #[arg(long, env = "DB_POOLER", value_enum, default_value_t = Pooler::None, global = true)]
    pub db_pooler: Pooler,

    /// Most database connections the pool opens.
    #[arg(long, env = "DB_MAX_CONNECTIONS", global = true)]
    pub db_max_connections: u32,

    /// How long a call waits for a free connection before failing UNAVAILABLE.
    #[arg(long, env = "DB_ACQUIRE_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration, global = true)]
    pub db_acquire_timeout: Duration,

    /// PostgreSQL statement_timeout for every statement.
    #[arg(long, env = "DB_STATEMENT_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration, global = true)]
    pub db_statement_timeout: Duration,

    /// Do not apply migrations when serving (run `migrate` separately).
    #[arg(long, env = "SKIP_MIGRATIONS", global = true)]
    pub skip_migrations: bool,

    /// How often readiness re-checks the database.
    #[arg(long, env = "HEALTH_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration, global = true)]
    pub health_interval: Duration,

    /// Longest wait for in-flight calls to finish after SIGTERM.
    #[arg(long, env = "SHUTDOWN_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration, global = true)]
    pub shutdown_timeout: Duration,

    /// Largest page a listing returns.
    #[arg(long, env = "MAX_PAGE_SIZE", default_value_t = 500, global = true)]
    pub max_page_size: u32,

    #[command(flatten)]
    pub log: LogArgs,

    #[command(flatten)]
    pub trace: crate::otel::TraceArgs,
}

impl CommonArgs {
    /// The service's pool, named `application_name` in `pg_stat_activity`.
    pub fn pool(&self, application_name: &str) -> PoolSettings {
        PoolSettings {
            url: self.database_url.clone(),
            direct_url: self.database_direct_url.clone(),
            pooler: self.db_pooler,
            max_connections: self.db_max_connections,
            acquire_timeout: self.db_acquire_timeout,
            statement_timeout: self.db_statement_timeout,
            application_name: application_name.to_owned(),
            asynchronous_commit: false,
        }
    }
}

/// The defaults of [`CommonArgs`] that differ between the services, as clap
/// parses them from the command line.
#[derive(Debug, Clone, Copy)]
pub struct ServiceDefaults {
    pub grpc_addr: &'static str,
    pub admin_addr: &'static str,
    pub db_max_connections: &'static str,
    pub log_filter: &'static str,
}

impl ServiceDefaults {
    /// `command` with these defaults: parsing and `--help` both see them.
    /// Panics (clap's own check) if `command` does not flatten [`CommonArgs`].
    pub fn apply(&self, command: clap::Command) -> clap::Command {
        [
            ("grpc_addr", self.grpc_addr),
            ("admin_addr", self.admin_addr),
            ("db_max_connections", self.db_max_connections),
            ("log_filter", self.log_filter),
        ]
        .into_iter()
        .fold(command, |command, (id, default)| {
            command.mut_arg(id, |arg| arg.default_value(default).required(false))
        })
    }
}

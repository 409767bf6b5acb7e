//! Database pool construction and error classification, shared by both
//! services so that "the database is down" means UNAVAILABLE everywhere.

use std::{str::FromStr, time::Duration};

use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};

/// How a service connects to PostgreSQL.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// `postgres://` URL of the service's database.
    pub url: String,
    /// Upper bound on connections (and so on concurrent statements).
    pub max_connections: u32,
    /// How long a call may wait for a free connection before failing with
    /// UNAVAILABLE instead of hanging.
    pub acquire_timeout: Duration,
    /// Server-side `statement_timeout`: no statement runs longer than this.
    pub statement_timeout: Duration,
    /// Shown in `pg_stat_activity`, so an operator can tell services apart.
    pub application_name: String,
    /// Commit without waiting for the WAL flush (`synchronous_commit = off`).
    /// Only for work that is safe to redo after a crash; see booking-service's
    /// worker pool.
    pub asynchronous_commit: bool,
}

/// Builds a pool that connects lazily: a service starts (and reports
/// NOT_SERVING) while the database is down, instead of crash-looping.
pub fn connect_lazy(settings: &PoolSettings) -> Result<PgPool, sqlx::Error> {
    let mut server_options = vec![(
        "statement_timeout",
        format!("{}ms", settings.statement_timeout.as_millis()),
    )];
    if settings.asynchronous_commit {
        server_options.push(("synchronous_commit", "off".to_owned()));
    }
    let options = PgConnectOptions::from_str(&settings.url)?
        .application_name(&settings.application_name)
        .options(server_options);
    Ok(PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(settings.acquire_timeout)
        // A broken connection surfaces as an I/O error (UNAVAILABLE) once and
        // is dropped; testing every checkout would cost a round trip per call.
        .test_before_acquire(false)
        .connect_lazy_with(options))
}

/// Creates the database named in `url` if it does not exist yet, so a fresh
/// server needs no manual `createdb`.
pub async fn create_database_if_missing(url: &str) -> Result<(), sqlx::Error> {
    use sqlx::migrate::MigrateDatabase;
    if !sqlx::Postgres::database_exists(url).await? {
        match sqlx::Postgres::create_database(url).await {
            Ok(()) => tracing::info!("created database"),
            // Another process created it between our check and create.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// What a database error means for the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DbFailure {
    /// The database cannot be reached or is shutting down: retry later.
    Unavailable,
    /// A statement ran past `statement_timeout` or was cancelled.
    Timeout,
    /// A unique index refused a row; carries the constraint name.
    UniqueViolation(String),
    /// Anything else: a bug or a schema mismatch, never the caller's fault.
    Other,
}

/// Classifies an error by what the caller can do about it.
pub fn classify(error: &sqlx::Error) -> DbFailure {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::BeginFailed
        // A connection cut during the handshake (server restarting, proxy
        // dropping it) shows up as an unexpected or missing protocol message.
        | sqlx::Error::Protocol(_) => DbFailure::Unavailable,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            match code.as_ref() {
                // query_canceled (statement_timeout, cancel request)
                "57014" => DbFailure::Timeout,
                // unique_violation
                "23505" => DbFailure::UniqueViolation(db.constraint().unwrap_or_default().into()),
                // admin_shutdown, crash_shutdown, cannot_connect_now,
                // too_many_connections, read-only / recovery
                "57P01" | "57P02" | "57P03" | "53300" | "25006" => DbFailure::Unavailable,
                // connection_exception class
                c if c.starts_with("08") => DbFailure::Unavailable,
                _ => DbFailure::Other,
            }
        }
        _ => DbFailure::Other,
    }
}

/// The current time at PostgreSQL's precision (microseconds), so that a
/// response built from values in hand equals what a later read returns.
pub fn now() -> chrono::DateTime<chrono::Utc> {
    use chrono::SubsecRound;
    chrono::Utc::now().trunc_subsecs(6)
}

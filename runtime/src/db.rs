//! Database pool construction and error classification, shared by both
//! services so that "the database is down" means UNAVAILABLE everywhere.

use std::{
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use sqlx::{
    PgConnection, PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};

/// What sits between a service and PostgreSQL at `DATABASE_URL`
/// (`DB_POOLER`): it decides which session features the pool may rely on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Pooler {
    /// PostgreSQL itself, or a session-mode pooler: one client connection is
    /// one server session, so prepared statements and startup options stay.
    None,
    /// A transaction-mode pooler (PgBouncer's `pool_mode = transaction`):
    /// between two transactions, each exchange may run on another server
    /// connection. No named prepared statement (sqlx-postgres's
    /// describe-only statement cache, `patches/sqlx-postgres/PATCHES.md`),
    /// no startup parameter PgBouncer refuses (`options`,
    /// `extra_float_digits`); session state (advisory locks, LISTEN) only
    /// on the direct URL.
    Transaction,
}

/// How a service connects to PostgreSQL.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// `postgres://` URL of the service's database (`DATABASE_URL`; through
    /// the pooler, if there is one).
    pub url: String,
    /// `DATABASE_DIRECT_URL`: the same database straight on PostgreSQL, for
    /// what needs a session of its own (migrations, LISTEN); `None` means
    /// `url` is direct.
    pub direct_url: Option<String>,
    /// What `url` reaches.
    pub pooler: Pooler,
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

/// A transaction-mode pooler was named without a way around it.
#[derive(Debug, thiserror::Error)]
#[error(
    "DB_POOLER=transaction needs DATABASE_DIRECT_URL: migrations (a session advisory lock) \
     and LISTEN cannot run through a transaction-mode pooler; set it to the same database \
     straight on PostgreSQL"
)]
pub struct NoDirectUrl;

impl PoolSettings {
    /// The same settings for a connection straight to PostgreSQL
    /// (migrations, LISTEN): `DATABASE_DIRECT_URL`, else `DATABASE_URL`
    /// when no transaction-mode pooler is in between.
    pub fn direct(&self) -> Result<PoolSettings, NoDirectUrl> {
        let url = match (&self.direct_url, self.pooler) {
            (Some(direct), _) => direct.clone(),
            (None, Pooler::None) => self.url.clone(),
            (None, Pooler::Transaction) => return Err(NoDirectUrl),
        };
        Ok(PoolSettings {
            url,
            direct_url: None,
            pooler: Pooler::None,
            ..self.clone()
        })
    }

    /// Whether [`direct`](Self::direct) reaches the server another way than
    /// `url` does (so session state needs connections of its own).
    pub fn has_separate_direct_url(&self) -> bool {
        self.direct_url
            .as_ref()
            .is_some_and(|direct| *direct != self.url)
    }
}

/// The connect options of `settings`: through a transaction-mode pooler,
/// without what it refuses or breaks (see [`Pooler::Transaction`]).
pub fn connect_options(settings: &PoolSettings) -> Result<PgConnectOptions, sqlx::Error> {
    let options =
        PgConnectOptions::from_str(&settings.url)?.application_name(&settings.application_name);
    Ok(match settings.pooler {
        Pooler::None => {
            let mut server_options = vec![(
                "statement_timeout",
                format!("{}ms", settings.statement_timeout.as_millis()),
            )];
            if settings.asynchronous_commit {
                server_options.push(("synchronous_commit", "off".to_owned()));
            }
            options.options(server_options)
        }
        // PgBouncer 1.18 refuses startup parameters it does not track (or,
        // listed in ignore_startup_parameters, drops them unapplied), so the
        // timeout comes from the role's settings; extra_float_digits only
        // changes text-format floats, which we never read (PostgreSQL 12+
        // prints them exactly by default anyway).
        Pooler::Transaction => options
            .extra_float_digits(None)
            .statement_cache_describe_only(true),
    })
}

/// Builds a pool that connects lazily: a service starts (and reports
/// NOT_SERVING) while the database is down, instead of crash-looping.
pub fn connect_lazy(settings: &PoolSettings) -> Result<PgPool, sqlx::Error> {
    let options = connect_options(settings)?;
    let pool = PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(settings.acquire_timeout)
        // A broken connection surfaces as an I/O error (UNAVAILABLE) once and
        // is dropped; testing every checkout would cost a round trip per call.
        .test_before_acquire(false);
    let pool = match settings.pooler {
        Pooler::None => pool,
        // The timeout is no longer ours to set: say so when the server's
        // differs, once per pool, rather than run without the limit unaware.
        Pooler::Transaction => {
            let expected = settings.statement_timeout;
            let warned = Arc::new(AtomicBool::new(false));
            pool.after_connect(move |connection, _| {
                let warned = warned.clone();
                Box::pin(async move {
                    let actual = server_statement_timeout(connection).await?;
                    if actual != expected && !warned.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            server_ms = actual.as_millis() as u64,
                            db_statement_timeout_ms = expected.as_millis() as u64,
                            "statement_timeout through the pooler differs from DB_STATEMENT_TIMEOUT: \
                             with DB_POOLER=transaction the service cannot send it; set it for the \
                             role (ALTER ROLE ... SET statement_timeout) or in the pooler's connect_query"
                        );
                    }
                    Ok(())
                })
            })
        }
    };
    Ok(pool.connect_lazy_with(options))
}

/// The `statement_timeout` the server applies to `connection`'s statements.
pub async fn server_statement_timeout(
    connection: &mut PgConnection,
) -> Result<Duration, sqlx::Error> {
    // pg_settings gives it in its unit (ms), where SHOW gives "5s".
    let millis: String =
        sqlx::query_scalar("SELECT setting FROM pg_settings WHERE name = 'statement_timeout'")
            .fetch_one(connection)
            .await?;
    millis
        .parse()
        .map(Duration::from_millis)
        .map_err(|e| sqlx::Error::Decode(Box::new(e)))
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
    /// The transaction lost to a concurrent one (deadlock, serialization
    /// failure, lock wait timed out): nothing was written, retry.
    Conflict,
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
                // deadlock_detected, serialization_failure, lock_not_available
                "40P01" | "40001" | "55P03" => DbFailure::Conflict,
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

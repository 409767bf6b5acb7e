//! Starting a service the same way in both: the steps around the service's
//! own parts. [`run_main`] is each `main`'s body (logging, refusing renamed
//! variables, logging a failure); [`bind`] takes the ports and the database
//! before serving; [`migrate`] creates the database and runs the service's
//! migrators.

use std::{future::Future, net::SocketAddr};

use anyhow::Context;
use sqlx::PgPool;
use tokio::net::TcpListener;

use crate::{
    config::{CommonArgs, RenamedVariables},
    db::{self, PoolSettings},
    telemetry::LogArgs,
};

/// Runs `command` (the service's serve or migrate) as `main` should: logs
/// set up first, a variable of the old naming scheme refused before anything
/// else happens, and a failure logged as "<service> failed" before it is
/// returned (and so printed, with a non-zero exit).
pub async fn run_main(
    service: &str,
    log: LogArgs,
    renamed: &RenamedVariables,
    command: impl Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    log.init();
    let result = match renamed.refuse(std::env::vars_os()) {
        Ok(()) => command.await,
        Err(renamed) => Err(renamed.into()),
    };
    if let Err(error) = &result {
        tracing::error!(error = format!("{error:#}"), "{service} failed");
    }
    result
}

/// A service's ports and database, taken before it serves.
#[derive(Debug)]
pub struct Bound {
    /// The gRPC port: bound before serving so tests can ask for port 0 and
    /// learn which they got.
    pub grpc: TcpListener,
    /// The admin port, unless `ADMIN_ADDR=off`.
    pub admin: Option<TcpListener>,
    /// Connects lazily: the service starts (NOT_SERVING) while the database
    /// is down, instead of crash-looping.
    pub pool: PgPool,
}

impl Bound {
    /// Where gRPC is served (`requested` if the socket cannot tell).
    pub fn grpc_addr(&self, requested: SocketAddr) -> SocketAddr {
        self.grpc.local_addr().unwrap_or(requested)
    }

    /// Where `/metrics` is served, if anywhere.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }
}

/// Binds the gRPC and admin ports, builds the lazy pool, then awaits
/// `migrations` unless `SKIP_MIGRATIONS`.
pub async fn bind(
    common: &CommonArgs,
    pool: &PoolSettings,
    migrations: impl Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<Bound> {
    let grpc = TcpListener::bind(common.grpc_addr)
        .await
        .with_context(|| format!("binding gRPC address {}", common.grpc_addr))?;
    let admin = common.admin_addr.bind().await?;
    let pool = db::connect_lazy(pool).context("parsing DATABASE_URL")?;
    if !common.skip_migrations {
        migrations.await?;
    }
    Ok(Bound { grpc, admin, pool })
}

/// Creates the database if missing, then runs `apply` (the service's
/// migrators, in order) on a pool of its own, closed afterwards. Both go
/// straight to PostgreSQL (`DATABASE_DIRECT_URL`, else `DATABASE_URL`):
/// sqlx's migrator holds a session advisory lock, which a transaction-mode
/// pooler would leave on whichever server connection ran it.
pub async fn migrate(
    service: &str,
    pool: &PoolSettings,
    apply: impl AsyncFnOnce(&PgPool) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let direct = pool.direct()?;
    db::create_database_if_missing(&direct.url).await.context(
        "creating the database (is PostgreSQL running? see DATABASE_DIRECT_URL, else DATABASE_URL)",
    )?;
    let migration_pool = db::connect_lazy(&direct)?;
    let applied = apply(&migration_pool).await;
    migration_pool.close().await;
    applied?;
    tracing::info!("{service} migrations applied");
    Ok(())
}

//! Building and running the server: pool, migrations, health, reflection,
//! the RPC log layer, and graceful shutdown.

use std::{future::Future, net::SocketAddr};

use anyhow::Context;
use maitre::{
    api::memory::v1::memory_service_server::MemoryServiceServer, health::Health,
    rpc_log::RpcLogLayer,
};
use sqlx::PgPool;
use tokio::{net::TcpListener, sync::watch};
use tonic::transport::{Server, server::TcpIncoming};

use crate::{config::Settings, grpc::MemoryApi, store};

/// The gRPC service name, as health checks and reflection know it.
pub const SERVICE_NAME: &str = "maitre.memory.v1.MemoryService";

/// A memory-service bound to its port, ready to serve.
pub struct Application {
    /// Bound before serving so that tests can ask for port 0 and learn it.
    listener: TcpListener,
    pool: PgPool,
    settings: Settings,
}

impl Application {
    /// Binds the port, builds the pool (lazily: the database may be down) and
    /// applies migrations unless `skip_migrations`.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(settings.grpc_addr)
            .await
            .with_context(|| format!("binding gRPC address {}", settings.grpc_addr))?;
        let pool = maitre::db::connect_lazy(&settings.pool()).context("parsing DATABASE_URL")?;
        if !settings.skip_migrations {
            migrate(&settings).await?;
        }
        Ok(Self {
            listener,
            pool,
            settings,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or(self.settings.grpc_addr)
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Serves until `shutdown` resolves; then reports NOT_SERVING, lets
    /// in-flight calls finish (at most `shutdown_timeout`), closes the pool.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Self {
            listener,
            pool,
            settings,
        } = self;
        let local_addr = listener.local_addr()?;
        let (reporter, health_service) = tonic_health::server::health_reporter();
        let health = Health::new(reporter, SERVICE_NAME).await;
        let (stopping_tx, stopping) = watch::channel(false);
        let watcher = tokio::spawn(health.clone().watch_database(
            pool.clone(),
            settings.health_interval,
            stopping.clone(),
        ));

        let (reflection_v1, reflection_v1alpha) = maitre::api::reflection_services()?;
        let api = MemoryServiceServer::new(MemoryApi::new(pool.clone(), settings.limits()))
            .max_decoding_message_size(settings.max_request_bytes());
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));

        let signal = {
            let health = health.clone();
            async move {
                shutdown.await;
                tracing::info!("shutting down: NOT_SERVING, draining in-flight calls");
                health.set_ready(false).await;
                let _ = stopping_tx.send(true);
            }
        };
        let server = Server::builder()
            .layer(RpcLogLayer)
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(api)
            .serve_with_incoming_shutdown(incoming, signal);

        tracing::info!(%local_addr, "memory-service listening");
        let mut drain_deadline = stopping.clone();
        let grace = settings.shutdown_timeout;
        tokio::select! {
            result = server => result.context("gRPC server failed")?,
            _ = async move {
                let _ = drain_deadline.wait_for(|s| *s).await;
                tokio::time::sleep(grace).await;
            } => tracing::warn!(?grace, "drain timed out; closing remaining calls"),
        }
        let _ = watcher.await;
        pool.close().await;
        tracing::info!("memory-service stopped");
        Ok(())
    }
}

/// Creates the database if missing and applies memory-service's migrations.
pub async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    maitre::db::create_database_if_missing(&settings.database_url)
        .await
        .context("creating the database (is PostgreSQL running? see DATABASE_URL)")?;
    let pool = maitre::db::connect_lazy(&settings.pool())?;
    store::migrator()
        .run(&pool)
        .await
        .context("applying memory-service migrations")?;
    pool.close().await;
    tracing::info!("memory-service migrations applied");
    Ok(())
}

//! Building and running booking-service: pool, migrations (apalis's, then
//! ours), the gRPC server, the follow-up workers, health, and shutdown.

use std::{future::Future, net::SocketAddr};

use anyhow::Context;
use apalis_postgres::PostgresStorage;
use maitre::{
    api::booking::v1::booking_service_server::BookingServiceServer, health::Health,
    rpc_log::RpcLogLayer,
};
use sqlx::PgPool;
use tokio::{net::TcpListener, sync::watch};
use tonic::transport::{Server, server::TcpIncoming};

use crate::{
    config::Settings,
    grpc::BookingApi,
    jobs::{self, JobContext, templates::TemplateCache},
    memory_client::MemoryClient,
    store,
};

/// The gRPC service name, as health checks and reflection know it.
pub const SERVICE_NAME: &str = "maitre.booking.v1.BookingService";

/// A booking-service bound to its port, ready to serve.
pub struct Application {
    /// Bound before serving so tests can ask for port 0 and learn it.
    listener: TcpListener,
    pool: PgPool,
    memory: MemoryClient,
    settings: Settings,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(settings.grpc_addr)
            .await
            .with_context(|| format!("binding gRPC address {}", settings.grpc_addr))?;
        let pool = maitre::db::connect_lazy(&settings.pool()).context("parsing DATABASE_URL")?;
        let memory = MemoryClient::new(&settings.memory_service_url, settings.memory_call_timeout)
            .with_context(|| {
                format!(
                    "MEMORY_SERVICE_URL {:?} is not a URL",
                    settings.memory_service_url
                )
            })?;
        if !settings.skip_migrations {
            migrate(&settings).await?;
        }
        Ok(Self {
            listener,
            pool,
            memory,
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

    /// Serves and runs the workers until `shutdown`; then NOT_SERVING, drain
    /// calls, let running jobs finish (at most `shutdown_timeout`), close the pool.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Self {
            listener,
            pool,
            memory,
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

        let workers = (!settings.disable_workers).then(|| {
            let ctx = JobContext {
                pool: pool.clone(),
                memory,
                templates: TemplateCache::default(),
                policy: settings.policy(),
            };
            tokio::spawn(jobs::workers::run(
                ctx,
                settings.workers(),
                stopping.clone(),
            ))
        });

        let (reflection_v1, reflection_v1alpha) = maitre::api::reflection_services()?;
        let api = BookingServiceServer::new(BookingApi::new(pool.clone(), settings.max_page_size))
            .max_decoding_message_size(64 * 1024);
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let signal = {
            let health = health.clone();
            async move {
                shutdown.await;
                tracing::info!(
                    "shutting down: NOT_SERVING, draining calls, finishing running jobs"
                );
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

        tracing::info!(%local_addr, workers = !settings.disable_workers, "booking-service listening");
        let everything = async {
            server.await.context("gRPC server failed")?;
            if let Some(workers) = workers {
                workers.await.context("follow-up workers panicked")?;
            }
            anyhow::Ok(())
        };
        let mut drain_deadline = stopping.clone();
        let grace = settings.shutdown_timeout;
        tokio::select! {
            result = everything => result?,
            _ = async move {
                let _ = drain_deadline.wait_for(|s| *s).await;
                tokio::time::sleep(grace).await;
            } => tracing::warn!(?grace, "drain timed out; unfinished jobs return to the queue after the orphan timeout"),
        }
        let _ = watcher.await;
        pool.close().await;
        tracing::info!("booking-service stopped");
        Ok(())
    }
}

/// Creates the database if missing, then applies apalis's migrations (schema
/// `apalis`) and booking-service's (schema `booking`, which indexes apalis's
/// job table and so must come second).
pub async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    maitre::db::create_database_if_missing(&settings.database_url)
        .await
        .context("creating the database (is PostgreSQL running? see DATABASE_URL)")?;
    let pool = maitre::db::connect_lazy(&settings.pool())?;
    PostgresStorage::setup(&pool)
        .await
        .context("applying apalis's migrations")?;
    store::migrator()
        .run(&pool)
        .await
        .context("applying booking-service migrations")?;
    pool.close().await;
    tracing::info!("booking-service migrations applied");
    Ok(())
}

//! Building and running booking-service: what is its own (its gRPC service,
//! the client of memory-service, its migrations after apalis's, the
//! follow-up workers and the metrics refresher) on top of the shared start-up
//! (`maitre_runtime::launch`: ports, pool, migrations) and server assembly
//! (`maitre_runtime::server`: health, reflection, the RPC layer, TLS, the
//! admin port, graceful shutdown that lets running jobs finish).

use std::{future::Future, net::SocketAddr, sync::Arc};

use anyhow::Context;
use apalis_postgres::PostgresStorage;
use maitre_api::booking::v1::booking_service_server::BookingServiceServer;
use maitre_runtime::{
    launch::{self, Bound},
    metrics::Metrics,
    otel::Tracer,
    server::{ServeSpec, serve},
};

use crate::{
    config::Settings,
    grpc::BookingApi,
    jobs::{self, JobContext, templates::TemplateCache, wakeups::Wakeups},
    memory_client::MemoryClient,
    metrics::BookingMetrics,
    store,
};

/// The gRPC service name, as health checks and reflection know it.
pub const SERVICE_NAME: &str = "maitre.booking.v1.BookingService";

/// Who may call what when AUTH_GRANTS is not set (README, Security):
/// assistants book, hold, move and read bookings; the payment provider's
/// webhook (`payments`) records payments; creating slots and erasing
/// customers (EraseCustomer) is for `admin`.
pub const DEFAULT_GRANTS: &str = "assistant=ListAvailability,CreateBooking,GetBooking,\
ListBookings,CancelBooking,ListFollowUps,HoldSeats,ConfirmHold,ReleaseHold,MoveBooking;\
payments=RecordPayment,GetBooking;admin=*";

/// Largest request message accepted (every booking request is small).
const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Largest response encoded: under the 4 MiB most clients accept by default.
const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024 - 64 * 1024;

/// A booking-service bound to its ports, ready to serve.
pub struct Application {
    bound: Bound,
    memory: MemoryClient,
    metrics: Arc<Metrics>,
    booking_metrics: Arc<BookingMetrics>,
    tracer: Tracer,
    settings: Settings,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        // Fail on bad auth/TLS configuration before binding anything.
        settings.server.validate(SERVICE_NAME, DEFAULT_GRANTS)?;
        settings.common.trace.validate()?;
        let memory = MemoryClient::new(&settings.memory_client()?)?;
        if !settings.disable_workers {
            // A pooler without a direct URL: refuse now, not once serving.
            settings.listener_pool()?;
        }
        let bound = launch::bind(&settings.common, &settings.pool(), migrate(&settings)).await?;
        let mut metrics = Metrics::new("booking-service");
        let booking_metrics = BookingMetrics::register(metrics.registry_mut());
        let tracer = settings
            .common
            .trace
            .tracer("booking-service", metrics.registry_mut())?;
        Ok(Self {
            bound,
            memory,
            metrics: Arc::new(metrics),
            booking_metrics,
            tracer,
            settings,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.bound.grpc_addr(self.settings.common.grpc_addr)
    }

    /// Where `/metrics` is served, if anywhere.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.bound.admin_addr()
    }

    /// Serves and runs the workers until `shutdown`; then NOT_SERVING, drain
    /// calls, let running jobs finish (at most `shutdown_timeout`), close the pool.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Self {
            bound,
            memory,
            metrics,
            booking_metrics,
            tracer,
            settings,
        } = self;
        let Bound { grpc, admin, pool } = bound;
        let wakeups = Wakeups::new();
        let api = BookingServiceServer::new(BookingApi::new(
            pool.clone(),
            settings.common.max_page_size,
            memory.clone(),
            wakeups.clone(),
            settings.lifecycle_times(),
        ))
        .max_decoding_message_size(MAX_REQUEST_BYTES)
        .max_encoding_message_size(MAX_RESPONSE_BYTES);
        let spec = ServeSpec {
            service_name: SERVICE_NAME,
            listener: grpc,
            admin_listener: admin,
            pool: pool.clone(),
            metrics,
            args: settings.server.clone(),
            default_grants: DEFAULT_GRANTS,
            max_request_bytes: MAX_REQUEST_BYTES + 1024,
            health_interval: settings.common.health_interval,
            shutdown_timeout: settings.common.shutdown_timeout,
            tracer: tracer.clone(),
        };
        let worker_pool = maitre_runtime::db::connect_lazy(&settings.worker_pool())
            .context("parsing DATABASE_URL")?;
        let direct_listener = match settings.disable_workers {
            true => None,
            false => settings.listener_pool()?,
        };
        let listener_pool = match direct_listener {
            Some(direct) => {
                maitre_runtime::db::connect_lazy(&direct).context("parsing DATABASE_DIRECT_URL")?
            }
            None => worker_pool.clone(),
        };
        let listener_pool_handle = listener_pool.clone();
        let worker_pool_handle = worker_pool.clone();
        let background = |stopping: tokio::sync::watch::Receiver<bool>| {
            let refresher = jobs::gauges::refresh_until(
                booking_metrics.clone(),
                pool.clone(),
                settings.metrics_refresh_interval,
                stopping.clone(),
            );
            // Sent from every replica, with or without workers of its own,
            // on the API pool (a replica without workers opens no worker
            // connection at all).
            let notifying = wakeups.clone().send_until(pool.clone(), stopping.clone());
            let workers = (!settings.disable_workers).then(|| {
                let statements = jobs::batches::HotStatements::new(
                    worker_pool.clone(),
                    settings.policy().claim_lease,
                    usize::from(settings.worker_batch_max),
                    booking_metrics.clone(),
                );
                let ctx = JobContext {
                    statements,
                    pool: worker_pool,
                    memory,
                    templates: TemplateCache::default(),
                    policy: settings.policy(),
                    metrics: booking_metrics,
                    wakeups,
                    tracer,
                };
                jobs::workers::run(ctx, settings.workers(), listener_pool, stopping)
            });
            Some(tokio::spawn(async move {
                match workers {
                    Some(workers) => {
                        tokio::join!(workers, refresher, notifying);
                    }
                    None => {
                        tokio::join!(refresher, notifying);
                    }
                }
                worker_pool_handle.close().await;
                listener_pool_handle.close().await;
            }))
        };
        let (horizon_low, horizon_high) = settings.retry_horizon();
        tracing::info!(
            workers = !settings.disable_workers,
            retry_horizon = format!(
                "{} to {}",
                crate::domain::backoff::hours(horizon_low),
                crate::domain::backoff::hours(horizon_high)
            ),
            "starting booking-service"
        );
        serve(spec, api, shutdown, background).await
    }
}

/// Creates the database if missing, then applies apalis's migrations (schema
/// `apalis`) and booking-service's (schema `booking`, which indexes apalis's
/// job table and so must come second).
pub async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    launch::migrate("booking-service", &settings.pool(), async |pool| {
        PostgresStorage::setup(pool)
            .await
            .context("applying apalis's migrations")?;
        store::migrator()
            .run(pool)
            .await
            .context("applying booking-service migrations")
    })
    .await
}

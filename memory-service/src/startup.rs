//! Building and running memory-service: what is its own (its gRPC service,
//! its limits, its migrations, the background purger that finishes erasures,
//! [`crate::erasure::Purger`]) on top of the shared start-up
//! (`maitre_runtime::launch`: ports, pool, migrations) and server assembly
//! (`maitre_runtime::server`: health, reflection, the RPC layer, TLS, the
//! admin port, graceful shutdown).

use std::{future::Future, net::SocketAddr, sync::Arc};

use anyhow::Context;
use maitre_api::memory::v1::memory_service_server::MemoryServiceServer;
use maitre_runtime::{
    launch::{self, Bound},
    metrics::Metrics,
    otel::Tracer,
    server::{ServeSpec, serve},
};

use crate::{
    config::Settings,
    erasure::Purger,
    feed::{Feed, FeedMetrics},
    grpc::MemoryApi,
    store,
    store::group_commit::{GroupCommitMetrics, MessageWriter},
};

/// The gRPC service name, as health checks and reflection know it.
pub const SERVICE_NAME: &str = "maitre.memory.v1.MemoryService";

/// Who may call what when AUTH_GRANTS is not set (README, Security):
/// assistants use conversations; booking-service reads emotion history,
/// delivers follow-ups and erases a customer's data (its own erasure RPC
/// calls DeleteUserData); the channel gateway follows the message feed
/// (WatchMessages); `admin` may do everything.
pub const DEFAULT_GRANTS: &str = "assistant=StoreMessage,GetConversation,ListMessages,\
GetEmotionHistory,ListConversations,CloseConversation,GetContext,GetConversationState,\
UpdateConversationState;\
booking-service=GetEmotionHistory,StoreMessage,DeleteUserData;gateway=WatchMessages;admin=*";

/// Largest response the server encodes. Most gRPC clients refuse to receive
/// more than 4 MiB by default, so a larger answer would fail at the client
/// after the server had built it; 64 KiB stay free for framing and trailers.
/// Limits that could produce a larger answer are refused at start-up
/// (`Settings::check_limits`), and listings are cut well below it
/// (`MEMORY_MAX_PAGE_BYTES`).
pub const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024 - 64 * 1024;

/// A memory-service bound to its ports, ready to serve.
pub struct Application {
    bound: Bound,
    metrics: Arc<Metrics>,
    group_commit_metrics: GroupCommitMetrics,
    feed_metrics: FeedMetrics,
    tracer: Tracer,
    settings: Settings,
}

impl Application {
    /// Binds the ports, builds the pool (lazily: the database may be down)
    /// and applies migrations unless `skip_migrations`.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        // Fail on bad limits, auth or TLS configuration before binding anything.
        settings.check_limits()?;
        settings.server.validate(SERVICE_NAME, DEFAULT_GRANTS)?;
        settings.common.trace.validate()?;
        let bound = launch::bind(&settings.common, &settings.pool(), migrate(&settings)).await?;
        let mut metrics = Metrics::new("memory-service");
        let group_commit_metrics = crate::metrics::register_group_commit(metrics.registry_mut());
        let feed_metrics = crate::metrics::register_feed(metrics.registry_mut());
        let tracer = settings
            .common
            .trace
            .tracer("memory-service", metrics.registry_mut())?;
        Ok(Self {
            bound,
            metrics: Arc::new(metrics),
            group_commit_metrics,
            feed_metrics,
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

    /// Serves until `shutdown`; then NOT_SERVING, in-flight calls finish (at
    /// most `shutdown_timeout`), the pool closes.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Self {
            bound,
            metrics,
            group_commit_metrics,
            feed_metrics,
            tracer,
            settings,
        } = self;
        let Bound { grpc, admin, pool } = bound;
        // Finishes erasures that DeleteUserData left unfinished, on every
        // replica; stops with the server (between two batches).
        let purger = Purger::new(pool.clone(), settings.purge());
        let writer =
            MessageWriter::spawn(pool.clone(), settings.group_commit(), group_commit_metrics);
        // Numbers committed messages for WatchMessages and ends the streams
        // when the server stops.
        let feed = Feed::new(pool.clone(), settings.feed(), feed_metrics);
        let api = MemoryApi::new(
            pool.clone(),
            writer,
            settings.limits(),
            purger.clone(),
            settings.purge(),
            feed.clone(),
        );
        let api = MemoryServiceServer::new(api)
            .max_decoding_message_size(settings.max_request_bytes())
            .max_encoding_message_size(MAX_RESPONSE_BYTES);
        let spec = ServeSpec {
            service_name: SERVICE_NAME,
            listener: grpc,
            admin_listener: admin,
            pool,
            metrics,
            args: settings.server.clone(),
            default_grants: DEFAULT_GRANTS,
            // Framing and a little slack over the decoder's own limit.
            max_request_bytes: settings.max_request_bytes() + 1024,
            health_interval: settings.common.health_interval,
            shutdown_timeout: settings.common.shutdown_timeout,
            tracer,
        };
        serve(spec, api, shutdown, move |stopping| {
            let purging = tokio::spawn(purger.run(stopping.clone()));
            let sequencing = tokio::spawn(feed.run(stopping));
            Some(tokio::spawn(async move {
                let _ = tokio::join!(purging, sequencing);
            }))
        })
        .await
    }
}

/// Creates the database if missing and applies memory-service's migrations.
pub async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    launch::migrate("memory-service", &settings.pool(), async |pool| {
        store::migrator()
            .run(pool)
            .await
            .context("applying memory-service migrations")
    })
    .await
}

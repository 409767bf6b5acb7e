//! Assembling and running a service's gRPC server the same way in both
//! services: health, reflection (switchable), the RPC layer (ids, auth,
//! shedding, deadlines, metrics, logs), optional TLS/mTLS, the admin HTTP
//! port, background tasks, and graceful shutdown.
//!
//! Environment variables read here (shared by both services): `REFLECTION`,
//! `MAX_CONCURRENT_RPCS`, `RPC_TIMEOUT`, `AUTH_TOKENS`, `AUTH_TOKENS_FILE`,
//! `TLS_CERT_FILE`, `TLS_KEY_FILE`, `TLS_CLIENT_CA_FILE`.

use std::{convert::Infallible, future::Future, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use sqlx::PgPool;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tonic::{
    body::Body,
    server::NamedService,
    transport::{Certificate, Identity, Server, ServerTlsConfig, server::TcpIncoming},
};
use tower::Service;

use crate::{
    health::Health,
    metrics::Metrics,
    rpc::{RpcLayer, RpcPolicy, TokenSet},
};

/// Flags both services share.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    /// Serve gRPC server reflection (v1 and v1alpha), for grpcurl and friends.
    #[arg(long, env = "REFLECTION", default_value_t = true, action = clap::ArgAction::Set, global = true)]
    pub reflection: bool,

    /// Calls handled at once; past this, calls fail at once with RESOURCE_EXHAUSTED.
    #[arg(
        long,
        env = "MAX_CONCURRENT_RPCS",
        default_value_t = 256,
        global = true
    )]
    pub max_concurrent_rpcs: usize,

    /// Deadline of calls that bring no grpc-timeout of their own.
    #[arg(long, env = "RPC_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration, global = true)]
    pub rpc_timeout: Duration,

    /// Accepted bearer tokens, comma-separated (prefer --auth-tokens-file). Setting any turns authentication on.
    #[arg(long, env = "AUTH_TOKENS", hide_env_values = true, global = true)]
    pub auth_tokens: Option<String>,

    /// File with accepted bearer tokens, one per line.
    #[arg(long, env = "AUTH_TOKENS_FILE", global = true)]
    pub auth_tokens_file: Option<PathBuf>,

    /// Server certificate (PEM); with --tls-key-file turns TLS on.
    #[arg(long, env = "TLS_CERT_FILE", requires = "tls_key_file", global = true)]
    pub tls_cert_file: Option<PathBuf>,

    /// Server private key (PEM).
    #[arg(long, env = "TLS_KEY_FILE", requires = "tls_cert_file", global = true)]
    pub tls_key_file: Option<PathBuf>,

    /// CA (PEM) that client certificates must chain to: turns mTLS on.
    #[arg(
        long,
        env = "TLS_CLIENT_CA_FILE",
        requires = "tls_cert_file",
        global = true
    )]
    pub tls_client_ca_file: Option<PathBuf>,
}

impl ServerArgs {
    /// The accepted tokens from `--auth-tokens` and `--auth-tokens-file`.
    pub fn tokens(&self) -> anyhow::Result<Option<TokenSet>> {
        let mut list = self.auth_tokens.clone().unwrap_or_default();
        if let Some(path) = &self.auth_tokens_file {
            let file = std::fs::read_to_string(path)
                .with_context(|| format!("reading AUTH_TOKENS_FILE {}", path.display()))?;
            list.push('\n');
            list.push_str(&file);
        }
        let tokens = TokenSet::parse(&list)
            .map_err(|e| anyhow::anyhow!("AUTH_TOKENS/AUTH_TOKENS_FILE: {e}"))?;
        Ok((!tokens.is_empty()).then_some(tokens))
    }

    /// TLS (and mTLS with a client CA), from the PEM files.
    pub fn tls(&self) -> anyhow::Result<Option<ServerTlsConfig>> {
        let (Some(cert), Some(key)) = (&self.tls_cert_file, &self.tls_key_file) else {
            return Ok(None);
        };
        let read = |path: &PathBuf, what: &str| {
            std::fs::read(path).with_context(|| format!("reading {what} {}", path.display()))
        };
        let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(
            read(cert, "TLS_CERT_FILE")?,
            read(key, "TLS_KEY_FILE")?,
        ));
        if let Some(ca) = &self.tls_client_ca_file {
            tls = tls.client_ca_root(Certificate::from_pem(read(ca, "TLS_CLIENT_CA_FILE")?));
        }
        Ok(Some(tls))
    }
}

/// Everything a service hands over to be served.
pub struct ServeSpec {
    /// Name for health and logs, e.g. `maitre.memory.v1.MemoryService`.
    pub service_name: &'static str,
    pub listener: TcpListener,
    /// The admin HTTP port's listener (`/metrics`); `None` serves none.
    pub admin_listener: Option<TcpListener>,
    pub pool: PgPool,
    pub metrics: Arc<Metrics>,
    pub args: ServerArgs,
    pub health_interval: Duration,
    /// Longest drain after shutdown begins.
    pub shutdown_timeout: Duration,
}

/// Serves `api` until `shutdown`; `background` starts tasks (workers) that
/// must stop when the watch turns true. Then: NOT_SERVING, drain calls and
/// background tasks (at most `shutdown_timeout`), close the pool.
pub async fn serve<S>(
    spec: ServeSpec,
    api: S,
    shutdown: impl Future<Output = ()> + Send + 'static,
    background: impl FnOnce(watch::Receiver<bool>) -> Option<JoinHandle<()>>,
) -> anyhow::Result<()>
where
    S: Service<http::Request<Body>, Error = Infallible>
        + NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    S::Response: axum::response::IntoResponse,
    S::Future: Send + 'static,
{
    let ServeSpec {
        service_name,
        listener,
        admin_listener,
        pool,
        metrics,
        args,
        health_interval,
        shutdown_timeout,
    } = spec;
    let local_addr = listener.local_addr()?;
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let health = Health::new(reporter, service_name).await;
    let (stopping_tx, stopping) = watch::channel(false);
    let watcher = tokio::spawn(health.clone().watch_database(
        pool.clone(),
        health_interval,
        stopping.clone(),
    ));
    let background = background(stopping.clone());

    let admin = admin_listener.map(|admin_listener| {
        let mut stop = stopping.clone();
        let (metrics, pool) = (metrics.clone(), pool.clone());
        tokio::spawn(async move {
            let addr = admin_listener.local_addr().ok();
            tracing::info!(?addr, "admin HTTP (/metrics, /healthz) listening");
            let stopped = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            if let Err(error) = crate::admin::serve(admin_listener, metrics, pool, stopped).await {
                tracing::error!(%error, "admin server failed");
            }
        })
    });

    let tokens = args.tokens()?;
    let authenticated = tokens.is_some();
    let policy = RpcPolicy::new(metrics, args.max_concurrent_rpcs, args.rpc_timeout, tokens);
    let reflection = if args.reflection {
        Some(crate::api::reflection_services()?)
    } else {
        None
    };
    let (reflection_v1, reflection_v1alpha) = match reflection {
        Some((v1, v1alpha)) => (Some(v1), Some(v1alpha)),
        None => (None, None),
    };
    let tls = args.tls()?;
    let tls_mode = match (&tls, &args.tls_client_ca_file) {
        (None, _) => "plaintext",
        (Some(_), None) => "tls",
        (Some(_), Some(_)) => "mtls",
    };
    let mut builder = Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).context("configuring TLS")?;
    }
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let signal = {
        let health = health.clone();
        async move {
            shutdown.await;
            tracing::info!("shutting down: NOT_SERVING, draining calls and background work");
            health.set_ready(false).await;
            let _ = stopping_tx.send(true);
        }
    };
    let server = builder
        .layer(RpcLayer::new(policy))
        .add_service(health_service)
        .add_optional_service(reflection_v1)
        .add_optional_service(reflection_v1alpha)
        .add_service(api)
        .serve_with_incoming_shutdown(incoming, signal);

    tracing::info!(%local_addr, service = service_name, tls = tls_mode, authenticated, reflection = args.reflection, "listening");
    let everything = async {
        server.await.context("gRPC server failed")?;
        if let Some(background) = background {
            background.await.context("background work panicked")?;
        }
        anyhow::Ok(())
    };
    let mut drain_deadline = stopping.clone();
    tokio::select! {
        result = everything => result?,
        _ = async move {
            let _ = drain_deadline.wait_for(|s| *s).await;
            tokio::time::sleep(shutdown_timeout).await;
        } => tracing::warn!(?shutdown_timeout, "drain timed out; abandoning what is left"),
    }
    let _ = watcher.await;
    if let Some(admin) = admin {
        let _ = admin.await;
    }
    pool.close().await;
    tracing::info!(service = service_name, "stopped");
    Ok(())
}

/// Where the admin HTTP server listens, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminAddr(pub Option<std::net::SocketAddr>);

impl std::str::FromStr for AdminAddr {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        if value.eq_ignore_ascii_case("off") {
            return Ok(Self(None));
        }
        value
            .parse()
            .map(|addr| Self(Some(addr)))
            .map_err(|_| format!("{value:?} is neither host:port nor \"off\""))
    }
}

impl AdminAddr {
    /// Binds the admin listener, if enabled.
    pub async fn bind(&self) -> anyhow::Result<Option<TcpListener>> {
        match self.0 {
            None => Ok(None),
            Some(addr) => {
                Ok(Some(TcpListener::bind(addr).await.with_context(|| {
                    format!("binding admin address {addr}")
                })?))
            }
        }
    }
}

//! Assembling and running a service's gRPC server the same way in both
//! services: health, reflection (switchable), the RPC layer (ids, auth,
//! shedding, deadlines, metrics, logs), optional TLS/mTLS, connection limits,
//! the admin HTTP port, background tasks, and graceful shutdown.
//!
//! [`ServerArgs`] are the flags of all this (auth, TLS, limits, reflection),
//! the same in both services: `--help` lists them with their environment
//! variables, README.md's Configuration section explains them.

use std::{
    convert::Infallible, future::Future, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration,
};

use anyhow::Context;
use sqlx::PgPool;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tonic::{
    body::Body,
    server::NamedService,
    transport::{Certificate, Identity, Server, ServerTlsConfig},
};
use tower::Service;

use crate::{
    health::Health,
    listener::ConnectionLimits,
    metrics::Metrics,
    rpc::{Access, Grants, RpcLayer, RpcLimits, RpcPolicy, TokenSet},
};

/// Whether callers must prove who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// Every call (but health checks) needs a bearer token or a client
    /// certificate; the server refuses to start without either configured.
    Required,
    /// No authentication at all: for a trusted network only.
    None,
}

/// A duration, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaybeDuration(pub Option<Duration>);

impl std::str::FromStr for MaybeDuration {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        if value.eq_ignore_ascii_case("off") {
            return Ok(Self(None));
        }
        humantime::parse_duration(value)
            .map(|d| Self(Some(d)))
            .map_err(|e| format!("{value:?}: {e} (or \"off\")"))
    }
}

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

    /// Longest deadline a client may ask for (longer grpc-timeout values are cut to this).
    #[arg(long, env = "MAX_RPC_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration, global = true)]
    pub max_rpc_timeout: Duration,

    /// How long a client has to send its request message after the call's headers; a stalled stream holds no slot meanwhile.
    #[arg(long, env = "REQUEST_READ_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration, global = true)]
    pub request_read_timeout: Duration,

    /// `required`: refuse to start unless callers must authenticate (AUTH_TOKENS_FILE / AUTH_TOKENS, or TLS_CLIENT_CA_FILE). `none`: no authentication, for a trusted network only (a loud warning unless bound to loopback).
    #[arg(long, env = "AUTH_MODE", value_enum, default_value_t = AuthMode::Required, global = true)]
    pub auth_mode: AuthMode,

    /// Accepted bearer tokens as `caller-name:token`, comma-separated (prefer --auth-tokens-file).
    #[arg(long, env = "AUTH_TOKENS", hide_env_values = true, global = true)]
    pub auth_tokens: Option<String>,

    /// File with accepted bearer tokens, one `caller-name:token` per line (`#` comments). Must not be empty.
    #[arg(long, env = "AUTH_TOKENS_FILE", global = true)]
    pub auth_tokens_file: Option<PathBuf>,

    /// Which methods each caller may call: `name=Method,Service/*,...;name=*`. Default: the service's own table (README, Security).
    #[arg(long, env = "AUTH_GRANTS", global = true)]
    pub auth_grants: Option<String>,

    /// Server certificate (PEM); with --tls-key-file turns TLS on.
    #[arg(long, env = "TLS_CERT_FILE", requires = "tls_key_file", global = true)]
    pub tls_cert_file: Option<PathBuf>,

    /// Server private key (PEM).
    #[arg(long, env = "TLS_KEY_FILE", requires = "tls_cert_file", global = true)]
    pub tls_key_file: Option<PathBuf>,

    /// CA (PEM) that client certificates must chain to: turns mTLS on; a certificate's DNS SAN (else CN) names its caller in AUTH_GRANTS.
    #[arg(
        long,
        env = "TLS_CLIENT_CA_FILE",
        requires = "tls_cert_file",
        global = true
    )]
    pub tls_client_ca_file: Option<PathBuf>,

    /// Most client connections open at once; more are closed on accept.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 1024, global = true)]
    pub max_connections: usize,

    /// Bytes of request messages being received at once, all calls together; past this, calls fail RESOURCE_EXHAUSTED (bounds memory against slow senders).
    #[arg(long, env = "MAX_PENDING_REQUEST_BYTES", default_value_t = 64 * 1024 * 1024, global = true)]
    pub max_pending_request_bytes: usize,

    /// Most concurrent HTTP/2 streams (calls) per connection.
    #[arg(
        long,
        env = "MAX_CONCURRENT_STREAMS",
        default_value_t = 100,
        global = true
    )]
    pub max_concurrent_streams: u32,

    /// A new connection must complete its TLS handshake / send the HTTP/2 preface within this, or is closed.
    #[arg(long, env = "HANDSHAKE_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration, global = true)]
    pub handshake_timeout: Duration,

    /// HTTP/2 PING interval on idle connections, to find dead peers.
    #[arg(long, env = "HTTP2_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration, global = true)]
    pub http2_keepalive_interval: Duration,

    /// A PING not answered within this closes the connection.
    #[arg(long, env = "HTTP2_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration, global = true)]
    pub http2_keepalive_timeout: Duration,

    /// TCP keepalive idle time, or `off`.
    #[arg(long, env = "TCP_KEEPALIVE", default_value = "60s", global = true)]
    pub tcp_keepalive: MaybeDuration,

    /// After this, a connection is asked to go away (GOAWAY), so long-lived clients reconnect and spread over replicas; `off` keeps connections forever.
    #[arg(long, env = "MAX_CONNECTION_AGE", default_value = "30m", global = true)]
    pub max_connection_age: MaybeDuration,

    /// Calls still running this long after the GOAWAY are cut with the connection.
    #[arg(long, env = "MAX_CONNECTION_AGE_GRACE", default_value = "1m", value_parser = humantime::parse_duration, global = true)]
    pub max_connection_age_grace: Duration,

    /// Most Health/Watch streams open at once (all clients); more get RESOURCE_EXHAUSTED.
    #[arg(
        long,
        env = "MAX_HEALTH_WATCHERS",
        default_value_t = 1000,
        global = true
    )]
    pub max_health_watchers: usize,

    /// Streams a client may reset before the server accepted them, per connection, before the connection is closed (rapid-reset protection).
    #[arg(
        long,
        env = "HTTP2_MAX_PENDING_RESET_STREAMS",
        default_value_t = 20,
        global = true
    )]
    pub http2_max_pending_reset_streams: usize,

    /// Streams the server may reset for a client's protocol errors, per connection, before the connection is closed.
    #[arg(
        long,
        env = "HTTP2_MAX_LOCAL_ERROR_RESETS",
        default_value_t = 1024,
        global = true
    )]
    pub http2_max_local_error_resets: usize,
}

impl ServerArgs {
    /// The accepted tokens from `--auth-tokens` and `--auth-tokens-file`.
    /// A file that cannot be read, or that lists no token, is an error:
    /// authentication never turns off by accident.
    pub fn tokens(&self) -> anyhow::Result<TokenSet> {
        let mut tokens = TokenSet::default();
        if let Some(list) = &self.auth_tokens {
            let parsed = TokenSet::parse(list, "AUTH_TOKENS").map_err(anyhow::Error::msg)?;
            if parsed.is_empty() {
                anyhow::bail!("AUTH_TOKENS is set but lists no token");
            }
            tokens.extend(parsed);
        }
        if let Some(path) = &self.auth_tokens_file {
            let source = format!("AUTH_TOKENS_FILE {}", path.display());
            let file =
                std::fs::read_to_string(path).with_context(|| format!("reading {source}"))?;
            let parsed = TokenSet::parse(&file, &source).map_err(anyhow::Error::msg)?;
            if parsed.is_empty() {
                anyhow::bail!(
                    "{source} lists no token: an empty token file would leave the server open; \
                     put `caller-name:token` lines in it, or set AUTH_MODE=none explicitly"
                );
            }
            tokens.extend(parsed);
        }
        Ok(tokens)
    }

    /// TLS (and mTLS with a client CA), from the PEM files.
    pub fn tls(&self) -> anyhow::Result<Option<ServerTlsConfig>> {
        let (Some(cert), Some(key)) = (&self.tls_cert_file, &self.tls_key_file) else {
            return Ok(None);
        };
        let read = |path: &PathBuf, what: &str| {
            std::fs::read(path).with_context(|| format!("reading {what} {}", path.display()))
        };
        let mut tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(
                read(cert, "TLS_CERT_FILE")?,
                read(key, "TLS_KEY_FILE")?,
            ))
            .timeout(self.handshake_timeout);
        if let Some(ca) = &self.tls_client_ca_file {
            tls = tls.client_ca_root(Certificate::from_pem(read(ca, "TLS_CLIENT_CA_FILE")?));
        }
        Ok(Some(tls))
    }

    /// Who may call what, checked against the methods this server serves
    /// (`service_name`'s, with `default_grants` unless AUTH_GRANTS is set).
    /// `None` is AUTH_MODE=none. Every way to leave the server open by
    /// mistake is an error here, at startup.
    pub fn access(
        &self,
        service_name: &str,
        default_grants: &str,
    ) -> anyhow::Result<Option<Access>> {
        let tokens = self.tokens()?;
        let client_certificates = self.tls_client_ca_file.is_some();
        match self.auth_mode {
            AuthMode::None => {
                if !tokens.is_empty() || client_certificates {
                    anyhow::bail!(
                        "AUTH_MODE=none, yet tokens or TLS_CLIENT_CA_FILE are configured: \
                         remove them, or drop AUTH_MODE=none to require them"
                    );
                }
                Ok(None)
            }
            AuthMode::Required => {
                if tokens.is_empty() && !client_certificates {
                    anyhow::bail!(
                        "authentication is required but not configured: set AUTH_TOKENS_FILE \
                         (`caller-name:token` lines) or TLS_CLIENT_CA_FILE (mTLS), or run with \
                         AUTH_MODE=none on a trusted network"
                    );
                }
                let served: std::collections::HashSet<String> =
                    crate::rpc::methods::known_methods(&[maitre_api::FILE_DESCRIPTOR_SET])
                        .into_iter()
                        .filter(|path| path.starts_with(&format!("{service_name}/")))
                        .collect();
                let spec = self.auth_grants.as_deref().unwrap_or(default_grants);
                let grants =
                    Grants::parse(spec, service_name, &served).map_err(anyhow::Error::msg)?;
                Ok(Some(Access {
                    tokens,
                    client_certificates,
                    grants,
                }))
            }
        }
    }

    /// Checks everything a server start would, without binding anything.
    pub fn validate(&self, service_name: &str, default_grants: &str) -> anyhow::Result<()> {
        self.access(service_name, default_grants)?;
        self.tls()?;
        Ok(())
    }

    fn connection_limits(&self) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: self.max_connections,
            handshake_timeout: self.handshake_timeout,
            tcp_keepalive: self.tcp_keepalive.0,
            hard_close_after: self
                .max_connection_age
                .0
                .map(|age| age + self.max_connection_age_grace),
        }
    }
}

/// Logs how the server is protected; loudly when it is not.
fn announce_auth(access: Option<&Access>, addr: SocketAddr, service_name: &str) {
    match access {
        None if addr.ip().is_loopback() => {
            tracing::info!(
                service = service_name,
                "authentication off (AUTH_MODE=none) on a loopback address"
            )
        }
        None => tracing::warn!(
            service = service_name,
            %addr,
            "INSECURE: authentication is OFF (AUTH_MODE=none) on a non-loopback address: \
             anyone who can reach this port can read and erase data"
        ),
        Some(access) => tracing::info!(
            service = service_name,
            tokens = access.tokens.len(),
            client_certificates = access.client_certificates,
            callers = ?access.grants.callers(),
            "authentication required"
        ),
    }
}

/// Largest request header block accepted (metadata: tokens, trace context).
const MAX_HEADER_LIST_BYTES: u32 = 64 * 1024;

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
    /// AUTH_GRANTS when the operator sets none.
    pub default_grants: &'static str,
    /// Largest request body the RPC layer reads (the decoder's limit plus framing).
    pub max_request_bytes: usize,
    pub health_interval: Duration,
    /// Longest drain after shutdown begins.
    pub shutdown_timeout: Duration,
    /// Sampling and span export (`otel::TraceArgs::tracer`); flushed last.
    pub tracer: crate::otel::Tracer,
}

/// Longest wait for queued spans to reach the collector at exit.
const TRACE_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

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
        default_grants,
        max_request_bytes,
        health_interval,
        shutdown_timeout,
        tracer,
    } = spec;
    let access = args.access(service_name, default_grants)?;
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

    announce_auth(access.as_ref(), local_addr, service_name);
    let limits = RpcLimits {
        max_concurrent: args.max_concurrent_rpcs,
        max_health_watchers: args.max_health_watchers,
        default_deadline: args.rpc_timeout,
        max_deadline: args.max_rpc_timeout,
        request_read_timeout: args.request_read_timeout,
        max_request_bytes,
        max_pending_request_bytes: args.max_pending_request_bytes,
    };
    let connection_metrics = metrics.connections.clone();
    let policy = RpcPolicy::new(service_name, metrics, limits, access, tracer.clone());
    let reflection = if args.reflection {
        Some(crate::reflection::services(service_name)?)
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
    // Every HTTP/2 knob set on purpose: tonic leaves the stream limit and
    // the error-reset limit unset, which h2 warns exposes a server to DoS.
    let mut builder = Server::builder()
        .max_concurrent_streams(args.max_concurrent_streams)
        .http2_keepalive_interval(Some(args.http2_keepalive_interval))
        .http2_keepalive_timeout(Some(args.http2_keepalive_timeout))
        .http2_max_pending_accept_reset_streams(Some(args.http2_max_pending_reset_streams))
        .http2_max_local_error_reset_streams(Some(args.http2_max_local_error_resets))
        .http2_max_header_list_size(MAX_HEADER_LIST_BYTES);
    if let Some(age) = args.max_connection_age.0 {
        // GOAWAY at the age; the listener cuts the connection after the grace.
        builder = builder.max_connection_age(age);
    }
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).context("configuring TLS")?;
    }
    let incoming =
        crate::listener::incoming(listener, args.connection_limits(), connection_metrics);
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

    tracing::info!(%local_addr, service = service_name, tls = tls_mode, reflection = args.reflection, "listening");
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
    // After the drain, so the spans of the last calls and jobs go out too.
    tracer.shutdown(TRACE_FLUSH_TIMEOUT).await;
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

//! Prometheus metrics every service exports on its admin port: RPCs by
//! method and code, latency histograms with explicit buckets (aggregatable
//! across pods, unlike summaries), in-flight calls, and pool usage. Each
//! service registers its own extra metrics in the same registry.

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use sqlx::PgPool;

/// Latency buckets in seconds, from 250 µs (a fast StoreMessage) to 10 s
/// (the default deadline).
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 10.0,
];

/// A histogram with [`LATENCY_BUCKETS`].
pub fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    /// `package.Service/Method`, or `unknown` for paths this server does not
    /// serve (so a scanner cannot grow the label set without bound).
    pub method: String,
    /// gRPC status code name, e.g. `OK`, `INVALID_ARGUMENT`.
    pub code: String,
}

/// A refused call: who asked for what.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeniedLabels {
    /// The caller's name when it is in the grants, else `unknown` (so that
    /// certificate names cannot grow the label set without bound).
    pub caller: String,
    pub method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    state: &'static str,
}

/// The metrics the RPC layer records.
#[derive(Debug)]
pub struct RpcMetrics {
    pub requests: Family<RpcLabels, Counter>,
    pub duration: Family<RpcLabels, Histogram, fn() -> Histogram>,
    pub in_flight: Gauge,
    /// Calls refused PERMISSION_DENIED, by caller and method.
    pub denied: Family<DeniedLabels, Counter>,
    /// Health/Watch streams open now.
    pub health_watchers: Gauge,
}

/// A service's registry and the metrics both services share.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub rpc: RpcMetrics,
    pub connections: crate::listener::ConnectionMetrics,
    pool_connections: Family<PoolLabels, Gauge>,
    pool_max: Gauge,
}

impl Metrics {
    /// Metrics named `maitre_*`, each labelled `service=<service>`.
    pub fn new(service: &str) -> Self {
        let mut registry = Registry::with_prefix_and_labels(
            "maitre",
            [("service".into(), service.to_owned().into())].into_iter(),
        );
        let rpc = RpcMetrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            in_flight: Gauge::default(),
            denied: Family::default(),
            health_watchers: Gauge::default(),
        };
        registry.register(
            "rpc_requests",
            "RPCs handled, by method and status code",
            rpc.requests.clone(),
        );
        registry.register(
            "rpc_duration_seconds",
            "RPC latency, by method and status code",
            rpc.duration.clone(),
        );
        registry.register(
            "rpc_in_flight",
            "RPCs being handled now",
            rpc.in_flight.clone(),
        );
        registry.register(
            "rpc_denied",
            "Calls refused PERMISSION_DENIED, by caller and method",
            rpc.denied.clone(),
        );
        registry.register(
            "health_watchers",
            "Health/Watch streams open now",
            rpc.health_watchers.clone(),
        );
        let connections = crate::listener::ConnectionMetrics::default();
        registry.register(
            "connections_open",
            "Client connections open now",
            connections.open.clone(),
        );
        registry.register(
            "connections_closed_by_server",
            "Connections the server closed, by reason (over_limit, handshake_timeout, max_age)",
            connections.closed.clone(),
        );
        let pool_connections = Family::<PoolLabels, Gauge>::default();
        let pool_max = Gauge::default();
        registry.register(
            "db_pool_connections",
            "Database connections, by state (idle, in_use)",
            pool_connections.clone(),
        );
        registry.register(
            "db_pool_max_connections",
            "Most connections the pool may open",
            pool_max.clone(),
        );
        Self {
            registry,
            rpc,
            connections,
            pool_connections,
            pool_max,
        }
    }

    /// For a service's own metrics; call before sharing `Metrics`.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// The text exposition, with pool gauges read at scrape time.
    pub fn render(&self, pool: &PgPool) -> String {
        let size = i64::from(pool.size());
        let idle = i64::try_from(pool.num_idle()).unwrap_or(i64::MAX);
        self.pool_connections
            .get_or_create(&PoolLabels { state: "idle" })
            .set(idle);
        self.pool_connections
            .get_or_create(&PoolLabels { state: "in_use" })
            .set((size - idle).max(0));
        self.pool_max
            .set(i64::from(pool.options().get_max_connections()));
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

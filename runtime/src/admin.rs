//! The admin HTTP port: `GET /metrics` (Prometheus text format) and
//! `GET /healthz` (process up; for tools that cannot speak gRPC health).
//! Kept off the gRPC port so scraping needs no gRPC credentials and can be
//! fenced by a NetworkPolicy of its own.

use std::{future::Future, sync::Arc};

use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use sqlx::PgPool;
use tokio::net::TcpListener;

use crate::metrics::Metrics;

#[derive(Clone)]
struct AdminState {
    metrics: Arc<Metrics>,
    pool: PgPool,
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(&state.pool),
    )
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    pool: PgPool,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(self::metrics))
        .route("/healthz", get(healthz))
        .with_state(AdminState { metrics, pool });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

//! `grpc.health.v1.Health` whose readiness follows the database.
//!
//! Names served: `""` (the whole server) and the service's own name report
//! readiness: SERVING while the database answers, NOT_SERVING while it does
//! not, and NOT_SERVING for good once shutdown begins. [`LIVENESS`] reports
//! SERVING as long as the process runs, so a kubelet restarts a wedged
//! process but not one that merely waits for its database.
//!
//! The check runs on a connection of its own, outside the serving pool: a
//! pool saturated by load is not an unreachable database, and readiness must
//! not take every replica out of the Service at once when traffic peaks.

use std::time::Duration;

use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::watch;
use tonic_health::{ServingStatus, server::HealthReporter};

/// The health name that answers SERVING whenever the process is up.
pub const LIVENESS: &str = "liveness";

/// Owns the health reporter and the readiness state of one service.
#[derive(Clone)]
pub struct Health {
    reporter: HealthReporter,
    service_name: String,
}

impl Health {
    /// Starts NOT_SERVING (not ready until the database has answered);
    /// liveness is SERVING at once.
    pub async fn new(reporter: HealthReporter, service_name: &str) -> Self {
        let health = Self {
            reporter,
            service_name: service_name.to_owned(),
        };
        health
            .reporter
            .set_service_status(LIVENESS, ServingStatus::Serving)
            .await;
        health.set_ready(false).await;
        health
    }

    /// Sets the readiness of `""` and the service name.
    pub async fn set_ready(&self, ready: bool) {
        let status = if ready {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.reporter.set_service_status("", status).await;
        self.reporter
            .set_service_status(&self.service_name, status)
            .await;
    }

    /// Checks the database every `interval` and flips readiness on change,
    /// until `stop` turns true; then reports NOT_SERVING for good.
    pub async fn watch_database(
        self,
        pool: PgPool,
        interval: Duration,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut ready: Option<bool> = None;
        let options = pool
            .connect_options()
            .as_ref()
            .clone()
            .application_name(&format!("{}-readiness", self.service_name));
        let mut connection: Option<PgConnection> = None;
        let timeout = interval.max(Duration::from_secs(1));
        loop {
            let now_ready = check(&mut connection, &options, timeout).await;
            if ready != Some(now_ready) {
                if now_ready {
                    tracing::info!(service = %self.service_name, "database reachable: SERVING");
                } else {
                    tracing::warn!(service = %self.service_name, "database unreachable: NOT_SERVING");
                }
                self.set_ready(now_ready).await;
                ready = Some(now_ready);
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = stop.wait_for(|stopping| *stopping) => break,
            }
        }
        self.set_ready(false).await;
    }
}

/// `SELECT 1` on the readiness connection, (re)connecting when there is
/// none; a failed check drops the connection so the next one starts afresh.
async fn check(
    connection: &mut Option<PgConnection>,
    options: &sqlx::postgres::PgConnectOptions,
    timeout: Duration,
) -> bool {
    let answered = tokio::time::timeout(timeout, async {
        if connection.is_none() {
            *connection = Some(PgConnection::connect_with(options).await?);
        }
        match connection.as_mut() {
            Some(conn) => sqlx::query("SELECT 1").execute(conn).await.map(|_| ()),
            None => Ok(()),
        }
    })
    .await;
    let ok = matches!(answered, Ok(Ok(())));
    if !ok {
        *connection = None;
    }
    ok
}

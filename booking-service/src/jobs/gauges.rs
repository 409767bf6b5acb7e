//! The gauges read from the database (queue depth by state, pending and
//! failed follow-ups), refreshed every `BOOKING_METRICS_REFRESH_INTERVAL`:
//! read through the store, handed to the metrics as numbers.

use std::{sync::Arc, time::Duration};

use sqlx::PgPool;
use tokio::sync::watch;

use crate::{metrics::BookingMetrics, store};

/// Re-reads queue depth and follow-up counts once.
pub async fn refresh(metrics: &BookingMetrics, pool: &PgPool) -> Result<(), sqlx::Error> {
    metrics.set_queue_depth(store::jobs::depth(pool).await?);
    let (pending, failed) = store::followups::pending_and_failed(pool).await?;
    metrics.set_followups(pending, failed);
    Ok(())
}

/// Refreshes every `interval` until `stop`.
pub async fn refresh_until(
    metrics: Arc<BookingMetrics>,
    pool: PgPool,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        if let Err(error) = refresh(&metrics, &pool).await {
            tracing::debug!(%error, "could not refresh queue metrics");
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

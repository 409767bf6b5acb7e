//! The safety net under the follow-up pipeline. Jobs normally carry every
//! follow-up to the end, but a job can die where no retry follows: apalis
//! gives up on a job whose handler failed on unexpected errors (a database
//! error mid-run) a few times in a row. These queries find work that no live
//! job will do any more, so housekeeping can enqueue it again: no follow-up
//! is ever silently lost.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// A job that can still run: waiting, taken, or failed with attempts left.
macro_rules! live_job {
    () => {
        "(j.status IN ('Pending', 'Queued', 'Running') \
          OR (j.status = 'Failed' AND j.attempts < j.max_attempts))"
    };
}

/// Pending follow-ups due more than `$1` seconds ago whose next delivery
/// attempt has no live job (the pending partial index, then apalis's unique
/// index on the idempotency key).
const STRANDED_DELIVERIES: &str = concat!(
    "SELECT f.id, f.attempts FROM booking.scheduled_followups f \
     WHERE f.state = 1 AND f.scheduled_at < now() - make_interval(secs => $1) \
       AND NOT EXISTS (SELECT 1 FROM apalis.jobs j \
           WHERE j.job_type = 'maitre.followup.deliver' \
             AND j.idempotency_key = f.id::text || '/' || (f.attempts + 1) \
             AND ",
    live_job!(),
    ") \
     ORDER BY f.scheduled_at LIMIT 500"
);

/// Confirmed bookings with ids in [$1, $2] (UUIDv7: a creation-time window,
/// scanned through the primary key), no follow-up row, and no live plan job
/// for any attempt up to `$3`.
const STRANDED_PLANS: &str = concat!(
    "SELECT b.id FROM booking.bookings b \
     WHERE b.id BETWEEN $1 AND $2 AND b.state = 1 \
       AND NOT EXISTS (SELECT 1 FROM booking.scheduled_followups f WHERE f.booking_id = b.id) \
       AND NOT EXISTS (SELECT 1 FROM apalis.jobs j \
           WHERE j.job_type = 'maitre.followup.plan' \
             AND j.idempotency_key = ANY (SELECT b.id::text || '/' || g FROM generate_series(1, $3) g) \
             AND ",
    live_job!(),
    ") \
     LIMIT 500"
);

/// Removes a dead job so that its idempotency key can be used again.
const DELETE_DEAD_JOB: &str = concat!(
    "DELETE FROM apalis.jobs j WHERE j.job_type = $1 AND j.idempotency_key = $2 AND NOT ",
    live_job!()
);

/// (follow-up id, attempts made) of stranded deliveries.
pub async fn stranded_deliveries(
    pool: &PgPool,
    grace_secs: f64,
) -> Result<Vec<(Uuid, i32)>, sqlx::Error> {
    sqlx::query_as::<_, (Uuid, i32)>(STRANDED_DELIVERIES)
        .bind(grace_secs)
        .fetch_all(pool)
        .await
}

/// Booking ids created in [from, until] whose planning stranded.
pub async fn stranded_plans(
    pool: &PgPool,
    from: DateTime<Utc>,
    until: DateTime<Utc>,
    max_attempts: i32,
) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar::<_, Uuid>(STRANDED_PLANS)
        .bind(v7_floor(from))
        .bind(v7_floor(until))
        .bind(max_attempts)
        .fetch_all(pool)
        .await
}

pub async fn delete_dead_job(
    tx: &mut PgConnection,
    queue: &str,
    key: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(DELETE_DEAD_JOB)
        .bind(queue)
        .bind(key)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// The smallest UUIDv7 of a millisecond: ids sort by creation time.
fn v7_floor(time: DateTime<Utc>) -> Uuid {
    let millis = u64::try_from(time.timestamp_millis()).unwrap_or(0);
    uuid::Builder::from_unix_timestamp_millis(millis, &[0; 10]).into_uuid()
}

#[cfg(test)]
mod tests {
    #[test]
    fn v7_floor_orders_with_real_ids() {
        let before = super::v7_floor(chrono::Utc::now() - chrono::Duration::seconds(1));
        let id = uuid::Uuid::now_v7();
        let after = super::v7_floor(chrono::Utc::now() + chrono::Duration::seconds(1));
        assert!(before < id && id < after);
    }
}

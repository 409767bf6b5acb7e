//! The safety net under the follow-up pipeline. Jobs normally carry every
//! follow-up to the end, but a job can die where no retry follows: apalis
//! gives up on a job whose handler failed on unexpected errors (a database
//! error mid-run) a few times in a row, and an operator may kill one. These
//! queries find work that no live job will do any more, so housekeeping can
//! enqueue it again: no follow-up is ever silently lost.
//!
//! Both read through partial indexes that hold only unfinished work
//! (`bookings_unplanned_idx`, `scheduled_followups_pending_idx`), so a sweep
//! costs what is unfinished, not what the history holds, and both page by
//! keyset so that each statement stays short however much is stranded.

use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// A job that can still run: waiting, taken, or failed with attempts left.
macro_rules! live_job {
    () => {
        "(j.status IN ('Pending', 'Queued', 'Running') \
          OR (j.status = 'Failed' AND j.attempts < j.max_attempts))"
    };
}
pub(crate) use live_job;

/// Rows per sweep statement.
pub const SWEEP_BATCH: i64 = 500;

/// Pending follow-ups due more than `$1` seconds ago, not claimed by a
/// running delivery, whose next delivery attempt has no live job; after the
/// keyset (`$2`, `$3`). The pending partial index, then apalis's unique
/// index on the idempotency key.
const STRANDED_DELIVERIES: &str = concat!(
    "SELECT f.id, f.attempts, f.scheduled_at FROM booking.scheduled_followups f \
     WHERE f.state = 1 AND f.scheduled_at < now() - make_interval(secs => $1) \
       AND f.scheduled_at >= $2 AND (f.scheduled_at, f.id) > ($2, $3) \
       AND (f.claimed_until IS NULL OR f.claimed_until < now()) \
       AND NOT EXISTS (SELECT 1 FROM apalis.jobs j \
           WHERE j.job_type = 'maitre.followup.deliver' \
             AND j.idempotency_key = f.id::text || '/' || (f.attempts + 1) \
             AND ",
    live_job!(),
    ") \
     ORDER BY f.scheduled_at, f.id LIMIT $4"
);

/// Confirmed bookings not yet planned, created before `$1` (a UUIDv7 floor:
/// older than the grace), after the keyset `$2`, whose newest plan attempt
/// has no live job. Only `bookings_unplanned_idx`, whatever their age.
const STRANDED_PLANS: &str = concat!(
    "SELECT b.id, b.plan_attempt FROM booking.bookings b \
     WHERE b.state = 1 AND b.followup_planned_at IS NULL AND b.id < $1 AND b.id > $2 \
       AND NOT EXISTS (SELECT 1 FROM apalis.jobs j \
           WHERE j.job_type = 'maitre.followup.plan' \
             AND j.idempotency_key = b.id::text || '/' || b.plan_attempt \
             AND ",
    live_job!(),
    ") \
     ORDER BY b.id LIMIT $3"
);

/// Removes a dead job so that its idempotency key can be used again.
const DELETE_DEAD_JOB: &str = concat!(
    "DELETE FROM apalis.jobs j WHERE j.job_type = $1 AND j.idempotency_key = $2 AND NOT ",
    live_job!()
);

/// A stranded delivery: (follow-up id, attempts made, scheduled at). The
/// last one's (scheduled at, id) is the next page's keyset.
pub type StrandedDelivery = (Uuid, i32, chrono::DateTime<chrono::Utc>);

/// One page of stranded deliveries after `after` (scheduled at, id).
pub async fn stranded_deliveries(
    pool: &PgPool,
    grace_secs: f64,
    after: (chrono::DateTime<chrono::Utc>, Uuid),
) -> Result<Vec<StrandedDelivery>, sqlx::Error> {
    sqlx::query_as::<_, StrandedDelivery>(STRANDED_DELIVERIES)
        .bind(grace_secs)
        .bind(after.0)
        .bind(after.1)
        .bind(SWEEP_BATCH)
        .fetch_all(pool)
        .await
}

/// One page of (booking id, newest plan attempt) of stranded plannings:
/// bookings created before `created_before`, ids after `after`.
pub async fn stranded_plans(
    pool: &PgPool,
    created_before: chrono::DateTime<chrono::Utc>,
    after: Uuid,
) -> Result<Vec<(Uuid, i32)>, sqlx::Error> {
    sqlx::query_as::<_, (Uuid, i32)>(STRANDED_PLANS)
        .bind(v7_floor(created_before))
        .bind(after)
        .bind(SWEEP_BATCH)
        .fetch_all(pool)
        .await
}

/// Deletes the dead job holding `key`, if any; returns how many went (0 or 1).
pub async fn delete_dead_job(
    tx: &mut PgConnection,
    queue: &str,
    key: &str,
) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(DELETE_DEAD_JOB)
        .bind(queue)
        .bind(key)
        .execute(&mut *tx)
        .await?
        .rows_affected())
}

/// The smallest UUIDv7 of a millisecond: ids sort by creation time.
pub fn v7_floor(time: chrono::DateTime<chrono::Utc>) -> Uuid {
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

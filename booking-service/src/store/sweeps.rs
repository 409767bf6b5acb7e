//! The safety net under the follow-up pipeline. Jobs normally carry every
//! follow-up to the end, but a job can die where no retry follows: apalis
//! gives up on a job whose handler failed on unexpected errors (a database
//! error mid-run) a few times in a row, and an operator may kill one. These
//! queries find work that no live job will do any more, so housekeeping can
//! enqueue it again: no follow-up is ever silently lost.
//!
//! Both read through partial indexes that hold only unfinished work, in due
//! order (`bookings_unplanned_due_idx`, `scheduled_followups_pending_idx`), so a sweep
//! costs what is unfinished, not what the history holds, and both page by
//! keyset so that each statement stays short however much is stranded.

use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::domain::followup_jobs::{DELIVER_QUEUE, PLAN_QUEUE};

/// A job that can still run: waiting, taken, or failed with attempts left
/// (apalis's own status names). Written out in each statement that needs it,
/// so each pastes into psql whole; a test checks that every copy is this one.
#[cfg(test)]
pub(crate) const LIVE_JOB: &str = r#"(j.status IN ('Pending', 'Queued', 'Running')
           OR (j.status = 'Failed' AND j.attempts < j.max_attempts))"#;

/// Rows per sweep statement.
pub const SWEEP_BATCH: i64 = 500;

/// A stranded delivery: (follow-up id, attempts made, scheduled at). The
/// last one's (scheduled at, id) is the next page's keyset.
pub type StrandedDelivery = (Uuid, i32, chrono::DateTime<chrono::Utc>);

/// One page of stranded deliveries after `after` (scheduled at, id):
/// pending follow-ups due more than `grace_secs` ago, not claimed by a
/// running delivery, whose next delivery attempt has no live job. The
/// pending partial index, then apalis's unique index on the idempotency key.
pub async fn stranded_deliveries(
    pool: &PgPool,
    grace_secs: f64,
    after: (chrono::DateTime<chrono::Utc>, Uuid),
) -> Result<Vec<StrandedDelivery>, sqlx::Error> {
    let rows = sqlx::query!(
        r#"
SELECT f.id, f.attempts, f.scheduled_at
FROM booking.scheduled_followups f
WHERE f.state = 1 /* followups::PENDING */
  AND f.scheduled_at < now() - make_interval(secs => $1)
  AND f.scheduled_at >= $2 AND (f.scheduled_at, f.id) > ($2, $3)
  AND (f.claimed_until IS NULL OR f.claimed_until < now())
  AND NOT EXISTS (
      SELECT 1 FROM apalis.jobs j
      WHERE j.job_type = $5
        AND j.idempotency_key = f.id::text || '/' || (f.attempts + 1)
        AND (j.status IN ('Pending', 'Queued', 'Running')
           OR (j.status = 'Failed' AND j.attempts < j.max_attempts)))
ORDER BY f.scheduled_at, f.id
LIMIT $4
"#,
        grace_secs,
        after.0,
        after.1,
        SWEEP_BATCH,
        DELIVER_QUEUE
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| (row.id, row.attempts, row.scheduled_at))
        .collect())
}

/// A stranded planning: (booking id, newest plan attempt, due time). The
/// last one's (due time, id) is the next page's keyset.
pub type StrandedPlan = (Uuid, i32, chrono::DateTime<chrono::Utc>);

/// One page of stranded plannings after `after` (due time, id): confirmed
/// bookings not yet planned whose follow-up job came due before `due_before`
/// (now − the grace), whose newest plan attempt has no live job — whatever
/// their age. Through `bookings_unplanned_due_idx`, in due order: the
/// bookings ahead (unplanned until their event ends) are never read.
/// Bookings without a due time (made before it was recorded) were due when
/// they were made.
pub async fn stranded_plans(
    pool: &PgPool,
    due_before: chrono::DateTime<chrono::Utc>,
    after: (chrono::DateTime<chrono::Utc>, Uuid),
) -> Result<Vec<StrandedPlan>, sqlx::Error> {
    let rows = sqlx::query!(
        r#"
SELECT b.id, b.plan_attempt, COALESCE(b.followup_due_at, b.created_at) AS "due!"
FROM booking.bookings b
WHERE b.state = 1 /* booking::CONFIRMED */ AND b.followup_planned_at IS NULL
  AND COALESCE(b.followup_due_at, b.created_at) < $1
  AND COALESCE(b.followup_due_at, b.created_at) >= $2
  AND (COALESCE(b.followup_due_at, b.created_at), b.id) > ($2, $3)
  AND NOT EXISTS (
      SELECT 1 FROM apalis.jobs j
      WHERE j.job_type = $5
        AND j.idempotency_key = b.id::text || '/' || b.plan_attempt
        AND (j.status IN ('Pending', 'Queued', 'Running')
           OR (j.status = 'Failed' AND j.attempts < j.max_attempts)))
ORDER BY COALESCE(b.followup_due_at, b.created_at), b.id
LIMIT $4
"#,
        due_before,
        after.0,
        after.1,
        SWEEP_BATCH,
        PLAN_QUEUE
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| (row.id, row.plan_attempt, row.due))
        .collect())
}

/// Deletes the dead job holding `key`, if any, so that the key can be used
/// again; returns how many went (0 or 1).
pub async fn delete_dead_job(
    tx: &mut PgConnection,
    queue: &str,
    key: &str,
) -> Result<u64, sqlx::Error> {
    let deleted = sqlx::query!(
        r#"
DELETE FROM apalis.jobs j
WHERE j.job_type = $1 AND j.idempotency_key = $2
  AND NOT (j.status IN ('Pending', 'Queued', 'Running')
           OR (j.status = 'Failed' AND j.attempts < j.max_attempts))
"#,
        queue,
        key
    )
    .execute(&mut *tx)
    .await?;
    Ok(deleted.rows_affected())
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

//! Planning progress, kept on the booking row (columns added by this
//! module's migration; CreateBooking leaves them at their defaults): when
//! the follow-up was planned, and the newest plan attempt enqueued.
//!
//! A confirmed booking with `followup_planned_at` NULL is unfinished work,
//! held in the partial index `bookings_unplanned_due_idx` until planning
//! records its outcome; the sweep reads only that index.

use chrono::{DateTime, Utc};
use maitre_runtime::otel::TracedStatement;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// Planning progress of one booking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanProgress {
    pub planned_at: Option<DateTime<Utc>>,
    /// The newest plan attempt enqueued.
    pub plan_attempt: i32,
}

pub async fn progress(
    pool: &PgPool,
    booking_id: Uuid,
) -> Result<Option<PlanProgress>, sqlx::Error> {
    sqlx::query_as!(
        PlanProgress,
        r#"
SELECT followup_planned_at AS planned_at, plan_attempt
FROM booking.bookings
WHERE id = $1
"#,
        booking_id
    )
    .fetch_optional(pool)
    .traced("planning::progress")
    .await
}

/// Takes plan attempt `next` for the booking: only while `next - 1` is the
/// newest attempt, the booking still confirmed and not yet planned. Two runs
/// of one attempt (jobs run at least once), or a run and the sweep, race
/// here: exactly one wins, so the retry chain never forks and never
/// restarts. True when this caller now holds attempt `next` (and must
/// enqueue it).
pub async fn advance(
    tx: &mut PgConnection,
    booking_id: Uuid,
    next: u32,
) -> Result<bool, sqlx::Error> {
    let next = i32::try_from(next).unwrap_or(i32::MAX);
    let advanced = sqlx::query!(
        r#"
UPDATE booking.bookings SET plan_attempt = $2
WHERE id = $1 AND plan_attempt = $2 - 1
  AND state = 1 /* booking::CONFIRMED */ AND followup_planned_at IS NULL
"#,
        booking_id,
        next
    )
    .execute(&mut *tx)
    .traced("planning::advance")
    .await?;
    Ok(advanced.rows_affected() == 1)
}

/// Records that planning is over for the booking (a follow-up was inserted,
/// or one was there already): it leaves the unplanned index.
pub async fn mark_planned(
    tx: &mut PgConnection,
    booking_id: Uuid,
    now: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        r#"
UPDATE booking.bookings SET followup_planned_at = $2
WHERE id = $1 AND followup_planned_at IS NULL
"#,
        booking_id,
        now
    )
    .execute(&mut *tx)
    .traced("planning::mark_planned")
    .await?;
    Ok(())
}

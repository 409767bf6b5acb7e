//! Planning progress, kept on the booking row (columns added by this
//! module's migration; CreateBooking leaves them at their defaults): when
//! the follow-up was planned, and the newest plan attempt enqueued.
//!
//! A confirmed booking with `followup_planned_at` NULL is unfinished work,
//! held in the partial index `bookings_unplanned_due_idx` until planning
//! records its outcome (`followups::insert_planned`); the sweep reads only
//! that index.

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use maitre_runtime::otel::{self, Recorder, TracedStatement};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::domain::{slot::stored_time_zone, template::RenderContext};

/// What planning reads of a booking, in one statement: what the wording
/// needs, and whether planning is over already.
#[derive(Debug, Clone)]
pub struct ToPlan {
    pub id: Uuid,
    pub customer_id: String,
    pub customer_name: String,
    pub conversation_id: Option<Uuid>,
    pub party_size: i32,
    pub state: i16,
    /// The event's start in the slot's own time zone.
    pub slot_starts_at: DateTime<Tz>,
    pub slot_ends_at: DateTime<Utc>,
    pub slot_label: String,
    pub planned_at: Option<DateTime<Utc>>,
}

impl ToPlan {
    /// What a template may say of this booking.
    pub fn render_context(&self) -> RenderContext<'_> {
        RenderContext {
            customer_name: &self.customer_name,
            party_size: self.party_size,
            slot_label: &self.slot_label,
            event_start: self.slot_starts_at,
        }
    }
}

/// A row of the planning read, before the slot's time zone is applied.
struct ToPlanRow {
    id: Uuid,
    customer_id: String,
    customer_name: String,
    conversation_id: Option<Uuid>,
    party_size: i32,
    state: i16,
    planned_at: Option<DateTime<Utc>>,
    slot_starts_at: DateTime<Utc>,
    slot_ends_at: DateTime<Utc>,
    slot_label: String,
    slot_time_zone: String,
}

impl From<ToPlanRow> for ToPlan {
    fn from(r: ToPlanRow) -> Self {
        ToPlan {
            id: r.id,
            customer_id: r.customer_id,
            customer_name: r.customer_name,
            conversation_id: r.conversation_id,
            party_size: r.party_size,
            state: r.state,
            slot_starts_at: r
                .slot_starts_at
                .with_timezone(&stored_time_zone(&r.slot_time_zone)),
            slot_ends_at: r.slot_ends_at,
            slot_label: r.slot_label,
            planned_at: r.planned_at,
        }
    }
}

pub async fn to_plan(pool: &PgPool, booking_id: Uuid) -> Result<Option<ToPlan>, sqlx::Error> {
    let recorders: Vec<Recorder> = Recorder::current().into_iter().collect();
    let found = to_plan_many(pool, &[booking_id], &recorders).await?;
    Ok(found.into_iter().next())
}

/// [`to_plan`] of many bookings in one statement (the follow-up jobs that
/// come due together): one answer per booking found, in no set order;
/// `recorders` get a client span each.
pub async fn to_plan_many(
    pool: &PgPool,
    booking_ids: &[Uuid],
    recorders: &[Recorder],
) -> Result<Vec<ToPlan>, sqlx::Error> {
    let statement = sqlx::query_as!(
        ToPlanRow,
        r#"
SELECT b.id, b.customer_id, b.customer_name, b.conversation_id, b.party_size, b.state,
       b.followup_planned_at AS planned_at,
       s.starts_at AS slot_starts_at, s.ends_at AS slot_ends_at, s.label AS slot_label,
       s.time_zone AS slot_time_zone
FROM booking.bookings b
JOIN booking.slots s ON s.id = b.slot_id
WHERE b.id = ANY($1::uuid[])
"#,
        booking_ids
    )
    .fetch_all(pool);
    let rows = otel::sql_batch(
        recorders,
        "planning::to_plan_many",
        booking_ids.len(),
        statement,
    )
    .await?;
    Ok(rows.into_iter().map(ToPlan::from).collect())
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

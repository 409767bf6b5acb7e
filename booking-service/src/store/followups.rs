//! Scheduled follow-ups: planning inserts them, delivery moves them along,
//! ListFollowUps reads them.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::rows::FollowUpRow;
use crate::domain::booking::FollowUpPage;

/// Follow-up states, stored as the proto enum's numbers.
pub const PENDING: i16 = 1;
pub const SENT: i16 = 2;
pub const CANCELLED: i16 = 3;
pub const FAILED: i16 = 4;

macro_rules! columns {
    () => {
        "id, booking_id, customer_id, conversation_id, trigger, template_key, rendered_text, \
         state, scheduled_at, attempts, last_error, message_id, created_at, sent_at"
    };
}

/// A planned follow-up, ready to insert.
#[derive(Debug, Clone)]
pub struct NewFollowUp {
    pub id: Uuid,
    pub booking_id: Uuid,
    pub customer_id: String,
    pub conversation_id: Option<Uuid>,
    pub trigger: &'static str,
    pub template_key: String,
    pub rendered_text: String,
    pub scheduled_at: DateTime<Utc>,
    pub plan_attempts: i32,
}

/// Inserts the follow-up unless one is already live for this booking and
/// trigger (the partial unique index decides, not a lookup), and only while
/// the booking is still confirmed. Returns whether a row was inserted.
const INSERT: &str = "INSERT INTO booking.scheduled_followups \
    (id, booking_id, customer_id, conversation_id, trigger, template_key, rendered_text, \
     state, scheduled_at, plan_attempts, created_at, updated_at) \
    SELECT $1, $2, $3, $4, $5, $6, $7, 1, $8, $9, $10, $10 \
    FROM booking.bookings b WHERE b.id = $2 AND b.state = 1 \
    ON CONFLICT (booking_id, trigger) WHERE state <> 3 DO NOTHING \
    RETURNING id";

pub async fn insert(
    tx: &mut PgConnection,
    f: &NewFollowUp,
    now: DateTime<Utc>,
) -> Result<bool, sqlx::Error> {
    let inserted = sqlx::query_scalar::<_, Uuid>(INSERT)
        .bind(f.id)
        .bind(f.booking_id)
        .bind(&f.customer_id)
        .bind(f.conversation_id)
        .bind(f.trigger)
        .bind(&f.template_key)
        .bind(&f.rendered_text)
        .bind(f.scheduled_at)
        .bind(f.plan_attempts)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
    Ok(inserted.is_some())
}

/// A follow-up locked for delivery, with its booking's state.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeliveryRow {
    #[sqlx(flatten)]
    pub follow_up: FollowUpRow,
    pub booking_state: i16,
}

/// Locks the follow-up row for the length of the delivery transaction, so a
/// concurrent CancelBooking waits and then sees it SENT (or cancels it
/// first, and delivery sees CANCELLED): never both.
const LOCK_FOR_DELIVERY: &str = concat!(
    "SELECT f.",
    "id, f.booking_id, f.customer_id, f.conversation_id, f.trigger, f.template_key, \
     f.rendered_text, f.state, f.scheduled_at, f.attempts, f.last_error, f.message_id, \
     f.created_at, f.sent_at, b.state AS booking_state \
     FROM booking.scheduled_followups f JOIN booking.bookings b ON b.id = f.booking_id \
     WHERE f.id = $1 FOR UPDATE OF f"
);

pub async fn lock_for_delivery(
    tx: &mut PgConnection,
    id: Uuid,
) -> Result<Option<DeliveryRow>, sqlx::Error> {
    sqlx::query_as::<_, DeliveryRow>(LOCK_FOR_DELIVERY)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await
}

pub async fn mark_sent(
    tx: &mut PgConnection,
    id: Uuid,
    message_id: Uuid,
    now: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE booking.scheduled_followups \
         SET state = 2, message_id = $2, sent_at = $3, updated_at = $3, attempts = attempts + 1, last_error = NULL \
         WHERE id = $1",
    )
    .bind(id)
    .bind(message_id)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

pub async fn mark_cancelled(
    tx: &mut PgConnection,
    id: Uuid,
    now: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE booking.scheduled_followups SET state = 3, updated_at = $2 WHERE id = $1 AND state = 1")
        .bind(id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Records a failed attempt: the count, the error, and either the next
/// scheduled time (still PENDING) or FAILED for good.
pub async fn record_failure(
    tx: &mut PgConnection,
    id: Uuid,
    error: &str,
    next_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE booking.scheduled_followups \
         SET attempts = attempts + 1, last_error = $2, updated_at = $4, \
             state = CASE WHEN $3::timestamptz IS NULL THEN 4 ELSE state END, \
             scheduled_at = COALESCE($3, scheduled_at) \
         WHERE id = $1",
    )
    .bind(id)
    .bind(error)
    .bind(next_at)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

const BY_BOOKING: &str = concat!(
    "SELECT ",
    columns!(),
    " FROM booking.scheduled_followups WHERE booking_id = $1 AND id > $2 ORDER BY id LIMIT $3"
);
const BY_CONVERSATION: &str = concat!(
    "SELECT ",
    columns!(),
    " FROM booking.scheduled_followups WHERE conversation_id = $1 AND id > $2 ORDER BY id LIMIT $3"
);

/// A page of follow-ups, oldest first, plus one extra row.
pub async fn list(pool: &PgPool, page: &FollowUpPage) -> Result<Vec<FollowUpRow>, sqlx::Error> {
    let (sql, parent) = match (page.booking_id, page.conversation_id) {
        (Some(booking), _) => (BY_BOOKING, booking),
        (None, Some(conversation)) => (BY_CONVERSATION, conversation),
        (None, None) => return Ok(Vec::new()),
    };
    sqlx::query_as::<_, FollowUpRow>(sql)
        .bind(parent)
        .bind(page.after.unwrap_or(Uuid::nil()))
        .bind(i64::from(page.page_size) + 1)
        .fetch_all(pool)
        .await
}

/// Pending and failed follow-ups, each counted through its partial index.
pub async fn pending_and_failed(pool: &PgPool) -> Result<(i64, i64), sqlx::Error> {
    sqlx::query_as::<_, (i64, i64)>(
        "SELECT (SELECT count(*) FROM booking.scheduled_followups WHERE state = 1), \
                (SELECT count(*) FROM booking.scheduled_followups WHERE state = 4)",
    )
    .fetch_one(pool)
    .await
}

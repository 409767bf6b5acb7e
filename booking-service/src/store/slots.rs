//! Creating slots and listing availability.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use super::rows::SlotRow;
use crate::domain::slot::{AvailabilityQuery, NewSlot};

const CREATE: &str = "INSERT INTO booking.slots \
    (id, starts_at, ends_at, capacity, label, request_id, created_at) \
    VALUES ($1, $2, $3, $4, $5, $6, $7) \
    ON CONFLICT (request_id) WHERE request_id IS NOT NULL DO NOTHING \
    RETURNING id, starts_at, ends_at, capacity, booked, label, created_at";

const BY_REQUEST_ID: &str = "SELECT id, starts_at, ends_at, capacity, booked, label, created_at \
    FROM booking.slots WHERE request_id = $1";

/// Slots starting in [from, until) with at least `min_seats` free, in start
/// order, after the cursor; one extra row tells whether a page follows.
const AVAILABILITY: &str = "SELECT id, starts_at, ends_at, capacity, booked, label, created_at \
    FROM booking.slots \
    WHERE starts_at >= $1 AND starts_at < $2 AND capacity - booked >= $3 \
      AND (starts_at, id) > ($4, $5) \
    ORDER BY starts_at, id LIMIT $6";

/// Creates a slot; a repeated `request_id` returns the first one.
#[tracing::instrument(skip_all)]
pub async fn create(
    pool: &PgPool,
    id: Uuid,
    slot: &NewSlot,
    now: DateTime<Utc>,
) -> Result<SlotRow, sqlx::Error> {
    let created = sqlx::query_as::<_, SlotRow>(CREATE)
        .bind(id)
        .bind(slot.starts_at)
        .bind(slot.ends_at)
        .bind(slot.capacity)
        .bind(&slot.label)
        .bind(slot.request_id.as_deref())
        .bind(now)
        .fetch_optional(pool)
        .await?;
    match created {
        Some(row) => Ok(row),
        None => {
            sqlx::query_as::<_, SlotRow>(BY_REQUEST_ID)
                .bind(slot.request_id.as_deref())
                .fetch_one(pool)
                .await
        }
    }
}

#[tracing::instrument(skip_all)]
pub async fn availability(
    pool: &PgPool,
    query: &AvailabilityQuery,
) -> Result<Vec<SlotRow>, sqlx::Error> {
    let (after_start, after_id) = query
        .after
        .map(|c| (c.starts_at, c.id))
        .unwrap_or((DateTime::<Utc>::UNIX_EPOCH, Uuid::nil()));
    sqlx::query_as::<_, SlotRow>(AVAILABILITY)
        .bind(query.from)
        .bind(query.until)
        .bind(query.min_seats)
        .bind(after_start)
        .bind(after_id)
        .bind(i64::from(query.page_size) + 1)
        .fetch_all(pool)
        .await
}

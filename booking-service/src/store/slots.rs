//! Creating slots and listing availability.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use super::rows::SlotRow;
use crate::domain::{
    idempotency::same_request,
    slot::{AvailabilityQuery, NewSlot},
};

/// The caller's earlier slot for a key, and the fingerprint it was made
/// with. Raw, not a macro: the row nests a [`SlotRow`] (`#[sqlx(flatten)]`).
const BY_REQUEST_ID: &str = r#"
SELECT id, starts_at, ends_at, capacity, booked, booking.held_seats(id) AS held, label,
       created_at, time_zone, request_fingerprint
FROM booking.slots
WHERE caller = $1 AND request_id = $2
"#;

/// What CreateSlot did.
#[derive(Debug, Clone)]
pub enum CreateOutcome {
    Created(SlotRow),
    /// The caller's `request_id` was seen before with the same request:
    /// the first slot, nothing written.
    Replayed(SlotRow),
    /// The caller's `request_id` was seen before with another request.
    RequestIdReused,
}

#[derive(sqlx::FromRow)]
struct KeyedSlot {
    #[sqlx(flatten)]
    slot: SlotRow,
    request_fingerprint: Option<Vec<u8>>,
}

/// Creates a slot; `caller` scopes the key (`""` when unauthenticated).
#[tracing::instrument(skip_all)]
pub async fn create(
    pool: &PgPool,
    id: Uuid,
    slot: &NewSlot,
    caller: &str,
    now: DateTime<Utc>,
) -> Result<CreateOutcome, sqlx::Error> {
    // Inserted unless this caller already used the key (the partial unique
    // index on (caller, request_id) decides, not a lookup).
    let created = sqlx::query_as!(
        SlotRow,
        r#"
INSERT INTO booking.slots
    (id, starts_at, ends_at, capacity, label, request_id, created_at, time_zone, caller,
     request_fingerprint)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
ON CONFLICT (caller, request_id) WHERE request_id IS NOT NULL DO NOTHING
RETURNING id, starts_at, ends_at, capacity, booked, 0 AS "held!", label, created_at, time_zone
"#,
        id,
        slot.starts_at,
        slot.ends_at,
        slot.capacity,
        slot.label,
        slot.request_id.as_deref(),
        now,
        slot.time_zone.name(),
        caller,
        slot.request_id.as_ref().map(|_| &slot.fingerprint[..])
    )
    .fetch_optional(pool)
    .await?;
    if let Some(row) = created {
        return Ok(CreateOutcome::Created(row));
    }
    // Only a conflicting key inserts nothing, and keys are never deleted.
    let earlier = sqlx::query_as::<_, KeyedSlot>(BY_REQUEST_ID)
        .bind(caller)
        .bind(slot.request_id.as_deref())
        .fetch_one(pool)
        .await?;
    Ok(
        if same_request(earlier.request_fingerprint.as_deref(), &slot.fingerprint) {
            CreateOutcome::Replayed(earlier.slot)
        } else {
            CreateOutcome::RequestIdReused
        },
    )
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
    // Slots starting in [from, until) with at least `min_seats` free (not
    // booked, not held by a live hold), in start order, after the cursor;
    // one extra row tells whether a page follows. The live holds of each
    // slot are a range read of `holds_live_idx` from now on (`now()`, the
    // statement's own transaction's time: a bound the index can use).
    sqlx::query_as!(
        SlotRow,
        r#"
SELECT s.id, s.starts_at, s.ends_at, s.capacity, s.booked, h.held AS "held!", s.label,
       s.created_at, s.time_zone
FROM booking.slots s
CROSS JOIN LATERAL (
    SELECT COALESCE(sum(party_size), 0)::int AS held FROM booking.holds
    WHERE slot_id = s.id AND booking_id IS NULL AND released_at IS NULL
      AND expires_at > now()
) h
WHERE s.starts_at >= $1 AND s.starts_at < $2 AND s.capacity - s.booked - h.held >= $3
  AND (s.starts_at, s.id) > ($4, $5)
ORDER BY s.starts_at, s.id
LIMIT $6
"#,
        query.from,
        query.until,
        query.min_seats,
        after_start,
        after_id,
        i64::from(query.page_size) + 1
    )
    .fetch_all(pool)
    .await
}

//! Holding seats, reading and releasing holds. (Confirming a hold is
//! `bookings::create` with the hold's id: the booking statement.)
//!
//! Why a hold's seats can never be sold twice, and why a hold expires
//! without anything running: see the header of migration
//! `holds_moves_payments`.

use chrono::{DateTime, Utc};
use maitre_runtime::otel::TracedStatement;
use sqlx::PgPool;
use uuid::Uuid;

use super::{bookings::SLOT_STATE, rows::HoldRow};
use crate::domain::{hold::NewHold, idempotency::same_request};

/// What HoldSeats did.
#[derive(Debug, Clone)]
pub enum HoldOutcome {
    Held(HoldRow),
    /// The key was seen before with the same request: the first hold as it
    /// is now, nothing written.
    Replayed(HoldRow),
    RequestIdReused,
    SlotNotFound,
    SlotFull {
        available: i32,
    },
    SlotStarted,
}

/// The hold in one statement. The key is checked first (`replay`). The
/// slot row is updated without changing a seat (`booked = booked`): the
/// write takes its lock, so seat takers of this slot queue up, and one that
/// waited re-checks its seats against the new row version and this hold.
/// The hold lasts `$8` seconds from the database's clock, and never past
/// the slot's start.
pub const HOLD: &str = r#"
WITH replay AS (
    SELECT request_fingerprint FROM booking.holds WHERE customer_id = $2 AND request_id = $5
),
seats AS (
    UPDATE booking.slots SET booked = booked
    WHERE id = $3 AND starts_at > $6
      AND NOT EXISTS (SELECT 1 FROM replay)
      AND booked + $4 + booking.held_seats(id) <= capacity
    RETURNING id, starts_at
),
hold AS (
    INSERT INTO booking.holds
        (id, slot_id, customer_id, party_size, request_id, request_fingerprint, created_at,
         expires_at)
    SELECT $1, seats.id, $2, $4, $5, $7, $6,
           LEAST(clock_timestamp() + make_interval(secs => $8), seats.starts_at)
    FROM seats
    RETURNING id
)
SELECT 'held' FROM hold
UNION ALL
SELECT CASE WHEN replay.request_fingerprint = $7 THEN 'replayed' ELSE 'reused' END FROM replay
"#;

const GET: &str = r#"
SELECT id, slot_id, customer_id, party_size, created_at, expires_at, booking_id, released_at,
       clock_timestamp() AS read_at
FROM booking.holds WHERE id = $1
"#;

/// Release: the slot row is locked first, as every seat change does (a
/// ConfirmHold of this hold either committed before, and nothing is
/// released, or waits and then finds the hold released). An expired hold is
/// left as it is.
const RELEASE: &str = r#"
WITH slot AS (
    UPDATE booking.slots s SET booked = s.booked
    FROM booking.holds h
    WHERE h.id = $1 AND h.customer_id = $2 AND s.id = h.slot_id
      AND h.booking_id IS NULL AND h.released_at IS NULL
    RETURNING s.id
)
UPDATE booking.holds h SET released_at = $3
WHERE h.id = $1 AND h.booking_id IS NULL AND h.released_at IS NULL
  AND h.expires_at > clock_timestamp() AND EXISTS (SELECT 1 FROM slot)
"#;

/// Holds seats for `ttl`; `now` is the request's time (the slot must not
/// have started).
#[tracing::instrument(skip_all, fields(slot_id = %hold.slot_id, party_size = hold.party_size))]
pub async fn hold(
    pool: &PgPool,
    id: Uuid,
    hold: &NewHold,
    now: DateTime<Utc>,
    ttl: std::time::Duration,
) -> Result<HoldOutcome, sqlx::Error> {
    let result = sqlx::query_scalar::<_, String>(HOLD)
        .bind(id)
        .bind(&hold.customer_id)
        .bind(hold.slot_id)
        .bind(hold.party_size)
        .bind(&hold.request_id)
        .bind(now)
        .bind(&hold.fingerprint)
        .bind(ttl.as_secs_f64())
        .fetch_optional(pool)
        .traced("holds::HOLD")
        .await;
    let outcome = match result {
        Ok(outcome) => outcome,
        // Two concurrent first calls with one key: the loser wrote nothing.
        Err(sqlx::Error::Database(e)) if e.constraint() == Some("holds_request_id_key") => {
            Some("replayed".to_owned())
        }
        Err(e) => return Err(e),
    };
    if outcome.as_deref() == Some("held") {
        return Ok(HoldOutcome::Held(
            get(pool, id).await?.ok_or(sqlx::Error::RowNotFound)?,
        ));
    }
    // A key seen before, or no seats: a concurrent twin of this call may
    // have held them with this key while this one waited for the slot, so
    // the key is looked up first either way.
    let earlier = sqlx::query_as::<_, KeyedHold>(BY_REQUEST_ID)
        .bind(&hold.customer_id)
        .bind(&hold.request_id)
        .fetch_optional(pool)
        .traced("holds::BY_REQUEST_ID")
        .await?;
    if let Some(earlier) = earlier {
        return Ok(
            if same_request(earlier.request_fingerprint.as_deref(), &hold.fingerprint) {
                HoldOutcome::Replayed(earlier.hold)
            } else {
                HoldOutcome::RequestIdReused
            },
        );
    }
    let state = sqlx::query_as::<_, (i32, DateTime<Utc>)>(SLOT_STATE)
        .bind(hold.slot_id)
        .fetch_optional(pool)
        .traced("bookings::SLOT_STATE")
        .await?;
    Ok(match state {
        None => HoldOutcome::SlotNotFound,
        Some((_, starts_at)) if starts_at <= now => HoldOutcome::SlotStarted,
        Some((available, _)) => HoldOutcome::SlotFull { available },
    })
}

/// A hold by key, with the fingerprint it was made with.
const BY_REQUEST_ID: &str = r#"
SELECT id, slot_id, customer_id, party_size, created_at, expires_at, booking_id, released_at,
       clock_timestamp() AS read_at, request_fingerprint
FROM booking.holds WHERE customer_id = $1 AND request_id = $2
"#;

#[derive(sqlx::FromRow)]
struct KeyedHold {
    #[sqlx(flatten)]
    hold: HoldRow,
    request_fingerprint: Option<Vec<u8>>,
}

#[tracing::instrument(skip(pool))]
pub async fn get(pool: &PgPool, id: Uuid) -> Result<Option<HoldRow>, sqlx::Error> {
    sqlx::query_as::<_, HoldRow>(GET)
        .bind(id)
        .fetch_optional(pool)
        .traced("holds::GET")
        .await
}

/// Releases a live hold of `customer_id`; answers the hold as it is after
/// (None: no such hold of this customer).
#[tracing::instrument(skip(pool, customer_id))]
pub async fn release(
    pool: &PgPool,
    id: Uuid,
    customer_id: &str,
    now: DateTime<Utc>,
) -> Result<Option<HoldRow>, sqlx::Error> {
    sqlx::query(RELEASE)
        .bind(id)
        .bind(customer_id)
        .bind(now)
        .execute(pool)
        .traced("holds::RELEASE")
        .await?;
    Ok(get(pool, id)
        .await?
        .filter(|hold| hold.customer_id == customer_id))
}

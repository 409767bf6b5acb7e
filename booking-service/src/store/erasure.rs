//! Erasing a customer from booking-service (EraseCustomer's first part):
//! one transaction that cancels their undelivered follow-ups, clears the
//! text of all of them, and pseudonymises their bookings.
//!
//! Ordering against the follow-up pipeline, which runs concurrently:
//! - the customer's bookings are locked first (FOR UPDATE), then their holds
//!   are erased: a ConfirmHold that marked one is waited for, and the
//!   bookings are read and locked again after that, so the booking it made
//!   is erased too; one not yet at its mark finds the hold released and
//!   books nothing;
//! - a plan job that is inserting a follow-up holds its booking FOR SHARE (the trigger of
//!   migration `customer_erasure`), so either it commits before the erasure
//!   reads the follow-ups (and its row is cleared here), or it waits for the
//!   erasure and its row is born cancelled and empty;
//! - a CANCELLED follow-up is never claimed for delivery, and FAILED ones
//!   are cancelled too, so RetryFollowUp cannot revive them;
//! - a delivery already claimed (claim, call, finish: no lock is held
//!   across the call) may still store its message after this commits, even
//!   after memory-service's DeleteUserData. [`deliveries_in_flight`] counts
//!   those claims; EraseCustomer reports itself incomplete while there are
//!   any, and its next call's DeleteUserData erases whatever they stored.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use crate::domain::erasure::{ERASED_REASON, pseudonym};

/// Everything else, in one statement over the locked bookings ($1):
/// - follow-ups (through `scheduled_followups_booking_idx`): undelivered
///   ones (PENDING, or FAILED and so re-drivable) CANCELLED with the reason,
///   every one's text and conversation cleared and customer id
///   pseudonymised; `old` is each row's state when locked, for the counts;
/// - bookings: name, cancellation reason, conversation and request id (a
///   caller-chosen key that may name the customer; replaced by the booking's
///   own id, unique, so the (customer, request id) key cannot collide)
///   cleared, the customer id pseudonymised, the erasure time recorded.
///   Slot, party size, state, payment, amounts and timestamps stay;
/// - the bookings' MoveBooking keys (caller-chosen, like request ids),
///   deleted (through the primary key of `moves`);
/// - the customer's conversation ownerships (through the primary key).
const ERASE: &str = r#"
WITH old AS (
    SELECT f.id, f.state FROM booking.scheduled_followups f
    WHERE f.booking_id = ANY($1)
    FOR UPDATE
),
followups AS (
    UPDATE booking.scheduled_followups f
    SET state = CASE WHEN old.state IN (1 /* followups::PENDING */, 4 /* followups::FAILED */)
                     THEN 3 /* followups::CANCELLED */ ELSE f.state END,
        last_error = CASE WHEN old.state IN (1 /* followups::PENDING */, 4 /* followups::FAILED */)
                          THEN $4 ELSE f.last_error END,
        customer_id = $2, conversation_id = NULL, rendered_text = '', updated_at = $3
    FROM old WHERE f.id = old.id
    RETURNING old.state AS was
),
bookings AS (
    UPDATE booking.bookings b
    SET customer_id = $2, customer_name = '', cancel_reason = NULL, conversation_id = NULL,
        request_id = b.id::text, request_fingerprint = NULL, erased_at = $3
    WHERE b.id = ANY($1)
    RETURNING b.id
),
moves AS (
    DELETE FROM booking.moves m WHERE m.booking_id = ANY($1)
),
owners AS (
    DELETE FROM booking.conversation_owners o
    WHERE o.conversation_id = ANY($6) AND o.customer_id = $5
    RETURNING o.conversation_id
)
SELECT (SELECT count(*) FROM bookings),
       (SELECT count(*) FROM followups WHERE was IN (1 /* followups::PENDING */, 4 /* followups::FAILED */)),
       (SELECT count(*) FROM followups)
"#;

/// The customer's holds ($1, through `holds_request_id_key`): pseudonymised
/// like the bookings (the key replaced by the hold's own id), and a hold not
/// confirmed is released, so its seats are free and it can never be
/// confirmed (ConfirmHold checks the hold's customer, now a pseudonym).
const ERASE_HOLDS: &str = r#"
UPDATE booking.holds
SET customer_id = $2, request_id = id::text, request_fingerprint = NULL, erased_at = $3,
    released_at = CASE WHEN booking_id IS NULL THEN COALESCE(released_at, $3) ELSE released_at END
WHERE customer_id = $1
"#;

/// The constraint a booking of the customer committed between the lock and
/// the ownership delete trips (its conversation's owner row is still
/// referenced): the erasure then runs again and takes that booking too.
const CONVERSATION_OWNER_FKEY: &str = "bookings_conversation_owner_fkey";

/// Runs of the transaction before giving up on racing bookings.
const ATTEMPTS: u32 = 3;

/// What the booking-service part of an erasure changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Erased {
    /// The customer's pseudonym (whether or not anything was erased now).
    pub pseudonym: String,
    pub bookings: i64,
    pub follow_ups_cancelled: i64,
    pub follow_ups_cleared: i64,
}

/// Erases `customer_id` from booking-service, in one transaction. A second
/// call finds nothing (the bookings no longer carry the id) and answers
/// zeros. Never logs the id.
#[tracing::instrument(skip_all)]
pub async fn erase(
    pool: &PgPool,
    customer_id: &str,
    now: DateTime<Utc>,
) -> Result<Erased, sqlx::Error> {
    let mut attempt = 1;
    loop {
        match erase_once(pool, customer_id, now).await {
            Err(sqlx::Error::Database(e))
                if e.constraint() == Some(CONVERSATION_OWNER_FKEY) && attempt < ATTEMPTS =>
            {
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// The customer's bookings, locked in id order (two erasures of one customer
/// queue up instead of deadlocking); through `bookings_customer_idx`.
async fn lock_bookings(
    tx: &mut sqlx::PgConnection,
    customer_id: &str,
) -> Result<Vec<LockedBooking>, sqlx::Error> {
    sqlx::query_as!(
        LockedBooking,
        r#"
SELECT id, conversation_id FROM booking.bookings
WHERE customer_id = $1
ORDER BY id
FOR UPDATE
"#,
        customer_id
    )
    .fetch_all(tx)
    .await
}

struct LockedBooking {
    id: Uuid,
    conversation_id: Option<Uuid>,
}

async fn erase_once(
    pool: &PgPool,
    customer_id: &str,
    now: DateTime<Utc>,
) -> Result<Erased, sqlx::Error> {
    let mut tx = pool.begin().await?;
    lock_bookings(&mut tx, customer_id).await?;
    // The database's pseudonym salt (one row, made by the migration).
    let salt = sqlx::query_scalar!("SELECT salt FROM booking.erasure_salt")
        .fetch_one(&mut *tx)
        .await?;
    let pseudonym = pseudonym(&salt, customer_id);
    // The holds: a ConfirmHold that marked one of them is waited for here,
    // and one still before its mark finds the hold released and books
    // nothing (see `bookings::CREATE`).
    sqlx::query(ERASE_HOLDS)
        .bind(customer_id)
        .bind(&pseudonym)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    // Read again, after that wait: the booking such a ConfirmHold made is
    // committed now, and is erased with the others.
    let locked = lock_bookings(&mut tx, customer_id).await?;
    if locked.is_empty() {
        tx.commit().await?;
        return Ok(Erased {
            pseudonym,
            ..Erased::default()
        });
    }
    let bookings: Vec<Uuid> = locked.iter().map(|row| row.id).collect();
    let conversations: Vec<Uuid> = locked
        .iter()
        .filter_map(|row| row.conversation_id)
        .collect();
    // A macro does not fit: count(*) of a CTE infers as nullable.
    let (bookings, follow_ups_cancelled, follow_ups_cleared) =
        sqlx::query_as::<_, (i64, i64, i64)>(ERASE)
            .bind(&bookings)
            .bind(&pseudonym)
            .bind(now)
            .bind(ERASED_REASON)
            .bind(customer_id)
            .bind(&conversations)
            .fetch_one(&mut *tx)
            .await?;
    tx.commit().await?;
    Ok(Erased {
        pseudonym,
        bookings,
        follow_ups_cancelled,
        follow_ups_cleared,
    })
}

/// How many deliveries of the erased customer's follow-ups may still store
/// a message (see the module's notes): claims still running (`claimed_until`
/// is cleared when a delivery finishes), found through the pseudonym
/// (`bookings_customer_idx`, then `scheduled_followups_booking_idx`).
#[tracing::instrument(skip_all)]
pub async fn deliveries_in_flight(pool: &PgPool, pseudonym: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar!(
        r#"
SELECT count(*) AS "count!"
FROM booking.bookings b
JOIN booking.scheduled_followups f ON f.booking_id = b.id
WHERE b.customer_id = $1 AND f.claimed_until > now()
"#,
        pseudonym
    )
    .fetch_one(pool)
    .await
}

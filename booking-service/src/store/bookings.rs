//! Creating, reading and cancelling bookings.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use super::{jobs, rows::BookingRow};
use crate::domain::booking::{BookingPage, CONFIRMED, NewBooking, PAYMENT_PENDING};
use crate::jobs::{PLAN_QUEUE, PlanFollowUp};

/// What CreateBooking did.
#[derive(Debug, Clone)]
pub enum CreateOutcome {
    Created(BookingRow),
    /// `request_id` was seen before: the first booking, nothing written.
    Replayed(BookingRow),
    SlotNotFound,
    /// Not enough free seats; how many there are.
    SlotFull {
        available: i32,
    },
    /// The slot's event has already started.
    SlotStarted,
}

/// The whole booking in one statement (one round trip, one implicit
/// transaction): seats, booking, pending payment, and the follow-up's plan
/// job. The seats are taken by a conditional UPDATE, so two concurrent
/// bookings can never both take the last seat: the second waits for the
/// first's row lock, re-checks `booked + n <= capacity` against the new
/// value, and finds no row. The plan job row is the one
/// `apalis_postgres::queries::push_tasks` writes (its `sink.sql`: same
/// columns, status, ULID id, JSON payload), inserted here so that the booking
/// and its job commit together without four more round trips; the test
/// `the_plan_job_row_matches_what_apalis_writes` keeps the two in step.
const CREATE: &str = "
WITH replay AS (
    SELECT 1 FROM booking.bookings WHERE customer_id = $2 AND request_id = $9
),
seats AS (
    UPDATE booking.slots SET booked = booked + $6
    WHERE id = $5 AND booked + $6 <= capacity AND starts_at > $10
      AND NOT EXISTS (SELECT 1 FROM replay)
    RETURNING id, starts_at, ends_at, label
),
new_booking AS (
    INSERT INTO booking.bookings
        (id, slot_id, customer_id, customer_name, conversation_id, party_size, state, request_id, created_at)
    SELECT $1, seats.id, $2, $3, $4, $6, 1, $9, $10 FROM seats
    RETURNING id
),
payment AS (
    INSERT INTO booking.payments (id, booking_id, state, currency, amount_minor, created_at, updated_at)
    SELECT $11, new_booking.id, 1, $7, $8, $10, $10 FROM new_booking
    RETURNING id
),
plan_job AS (
    INSERT INTO apalis.jobs
        (id, job_type, job, status, attempts, max_attempts, run_at, priority, metadata, idempotency_key)
    SELECT $12, $13, $14, 'Pending', 0, $15, now(), 0, ''::hstore, $16 FROM new_booking
    RETURNING id
)
SELECT seats.starts_at, seats.ends_at, seats.label, false AS replayed
FROM seats, new_booking, payment, plan_job
UNION ALL
SELECT NULL, NULL, NULL, true FROM replay
";

/// Why no seats were taken: unknown slot, full, or already started.
const SLOT_STATE: &str = "SELECT capacity - booked, starts_at FROM booking.slots WHERE id = $1";

macro_rules! booking_select {
    () => {
        "SELECT b.id, b.slot_id, b.customer_id, b.customer_name, b.conversation_id, b.party_size, \
                b.state, b.request_id, b.created_at, b.cancelled_at, \
                s.starts_at AS slot_starts_at, s.ends_at AS slot_ends_at, s.label AS slot_label, \
                p.id AS payment_id, p.state AS payment_state, p.currency, p.amount_minor \
         FROM booking.bookings b \
         JOIN booking.slots s ON s.id = b.slot_id \
         JOIN booking.payments p ON p.booking_id = b.id "
    };
}

const GET: &str = concat!(booking_select!(), "WHERE b.id = $1");
const BY_REQUEST_ID: &str = concat!(
    booking_select!(),
    "WHERE b.customer_id = $1 AND b.request_id = $2"
);
const LIST_FOR_CUSTOMER: &str = concat!(
    booking_select!(),
    "WHERE b.customer_id = $1 AND b.id < $2 ORDER BY b.id DESC LIMIT $3"
);

/// Books seats and enqueues the follow-up planning job in one statement:
/// either the booking and its job both exist, or neither does.
#[tracing::instrument(skip_all, fields(slot_id = %booking.slot_id, party_size = booking.party_size))]
pub async fn create(
    pool: &PgPool,
    booking_id: Uuid,
    payment_id: Uuid,
    booking: &NewBooking,
    now: DateTime<Utc>,
    trace_parent: Option<String>,
) -> Result<CreateOutcome, sqlx::Error> {
    let plan = jobs::plan_job_row(&PlanFollowUp {
        booking_id,
        attempt: 1,
        trace_parent,
    })?;
    let result = sqlx::query_as::<
        _,
        (
            Option<DateTime<Utc>>,
            Option<DateTime<Utc>>,
            Option<String>,
            bool,
        ),
    >(CREATE)
    .bind(booking_id)
    .bind(&booking.customer_id)
    .bind(&booking.customer_name)
    .bind(booking.conversation_id)
    .bind(booking.slot_id)
    .bind(booking.party_size)
    .bind(&booking.deposit_currency)
    .bind(booking.deposit_minor)
    .bind(&booking.request_id)
    .bind(now)
    .bind(payment_id)
    .bind(&plan.id)
    .bind(PLAN_QUEUE)
    .bind(&plan.payload)
    .bind(plan.max_attempts)
    .bind(&plan.idempotency_key)
    .fetch_optional(pool)
    .await;
    let row = match result {
        Ok(row) => row,
        // Two concurrent first calls with one request_id: the loser's
        // statement failed whole (no seat taken); answer with the winner's.
        Err(sqlx::Error::Database(e)) if e.constraint() == Some("bookings_request_id_key") => {
            return replay(pool, booking).await;
        }
        Err(e) => return Err(e),
    };
    match row {
        Some((_, _, _, true)) => replay(pool, booking).await,
        Some((Some(slot_starts_at), Some(slot_ends_at), Some(slot_label), false)) => {
            // Answered from the values in hand: no read after the write.
            Ok(CreateOutcome::Created(BookingRow {
                id: booking_id,
                slot_id: booking.slot_id,
                customer_id: booking.customer_id.clone(),
                customer_name: booking.customer_name.clone(),
                conversation_id: booking.conversation_id,
                party_size: booking.party_size,
                state: CONFIRMED,
                request_id: booking.request_id.clone(),
                created_at: now,
                cancelled_at: None,
                slot_starts_at,
                slot_ends_at,
                slot_label,
                payment_id,
                payment_state: PAYMENT_PENDING,
                currency: booking.deposit_currency.clone(),
                amount_minor: booking.deposit_minor,
            }))
        }
        _ => {
            let state = sqlx::query_as::<_, (i32, DateTime<Utc>)>(SLOT_STATE)
                .bind(booking.slot_id)
                .fetch_optional(pool)
                .await?;
            Ok(match state {
                None => CreateOutcome::SlotNotFound,
                Some((_, starts_at)) if starts_at <= now => CreateOutcome::SlotStarted,
                Some((available, _)) => CreateOutcome::SlotFull { available },
            })
        }
    }
}

async fn replay(pool: &PgPool, booking: &NewBooking) -> Result<CreateOutcome, sqlx::Error> {
    let row = sqlx::query_as::<_, BookingRow>(BY_REQUEST_ID)
        .bind(&booking.customer_id)
        .bind(&booking.request_id)
        .fetch_one(pool)
        .await?;
    Ok(CreateOutcome::Replayed(row))
}

#[tracing::instrument(skip(pool))]
pub async fn get(pool: &PgPool, id: Uuid) -> Result<Option<BookingRow>, sqlx::Error> {
    sqlx::query_as::<_, BookingRow>(GET)
        .bind(id)
        .fetch_optional(pool)
        .await
}

/// A page of a customer's bookings, newest first, plus one extra row.
#[tracing::instrument(skip_all, fields(customer_id = %page.customer_id))]
pub async fn list_for_customer(
    pool: &PgPool,
    page: &BookingPage,
) -> Result<Vec<BookingRow>, sqlx::Error> {
    sqlx::query_as::<_, BookingRow>(LIST_FOR_CUSTOMER)
        .bind(&page.customer_id)
        .bind(page.after.unwrap_or(Uuid::max()))
        .bind(i64::from(page.page_size) + 1)
        .fetch_all(pool)
        .await
}

/// Cancel: the booking, its seats, its payment and its pending follow-ups,
/// all or nothing. Only a CONFIRMED booking changes, so a second cancel
/// releases nothing. Returns the number of follow-ups cancelled, or `None`
/// for an unknown booking.
const CANCEL: &str = "
WITH cancelled AS (
    UPDATE booking.bookings SET state = 2, cancelled_at = $2, cancel_reason = NULLIF($3, '')
    WHERE id = $1 AND state = 1
    RETURNING id, slot_id, party_size
),
seats AS (
    UPDATE booking.slots s SET booked = s.booked - c.party_size
    FROM cancelled c WHERE s.id = c.slot_id
    RETURNING s.id
),
payment AS (
    UPDATE booking.payments p SET state = 3, updated_at = $2
    FROM cancelled c WHERE p.booking_id = c.id AND p.state = 1
    RETURNING p.id
),
followups AS (
    UPDATE booking.scheduled_followups f SET state = 3, updated_at = $2
    FROM cancelled c WHERE f.booking_id = c.id AND f.state = 1
    RETURNING f.id
)
SELECT EXISTS (SELECT 1 FROM booking.bookings WHERE id = $1),
       (SELECT count(*) FROM followups)::int,
       (SELECT count(*) FROM seats)::int
";

#[tracing::instrument(skip(pool, reason))]
pub async fn cancel(
    pool: &PgPool,
    id: Uuid,
    reason: &str,
    now: DateTime<Utc>,
) -> Result<Option<i32>, sqlx::Error> {
    let (exists, followups_cancelled, _) = sqlx::query_as::<_, (bool, i32, i32)>(CANCEL)
        .bind(id)
        .bind(now)
        .bind(reason)
        .fetch_one(pool)
        .await?;
    Ok(exists.then_some(followups_cancelled))
}

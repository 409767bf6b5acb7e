//! Creating, reading and cancelling bookings.

use chrono::{DateTime, Utc};
use maitre_runtime::otel::TracedStatement;
use sqlx::PgPool;
use uuid::Uuid;

use super::{jobs, rows::BookingRow};
use crate::domain::{
    PRE_EVENT_TRIGGER,
    booking::{BookingPage, CONFIRMED, LifecycleTimes, NewBooking, PAYMENT_PENDING},
    followup_jobs::{DELIVER_QUEUE, DeliverFollowUp, PLAN_QUEUE, PlanFollowUp},
    idempotency::same_request,
    slot::stored_time_zone,
};

/// What CreateBooking did.
#[derive(Debug, Clone)]
pub enum CreateOutcome {
    Created(BookingRow),
    /// `request_id` was seen before with the same request: the first
    /// booking, nothing written.
    Replayed(BookingRow),
    /// `request_id` was seen before with another request: nothing written.
    RequestIdReused,
    /// The conversation belongs to another customer: nothing written.
    ConversationOfAnotherCustomer,
    SlotNotFound,
    /// Not enough free seats; how many there are.
    SlotFull {
        available: i32,
    },
    /// The slot's event has already started.
    SlotStarted,
    /// ConfirmHold: the hold stopped being live while the statement ran
    /// (released by an erasure): nothing written.
    HoldLost,
}

/// The whole booking in one statement (one round trip, one implicit
/// transaction): seats, booking, pending payment, the follow-up's job, due
/// at the event's end + `BOOKING_FOLLOWUP_DELAY` (`$18`, seconds), and the
/// reminder. The follow-up plans and delivers then, from the freshest
/// emotion history, and nothing of the pipeline runs during the booking
/// burst.
///
/// Seats are taken by a conditional UPDATE of the slot row, so two
/// concurrent bookings can never both take the last seat: the second waits
/// for the first's row lock, re-checks its condition against the new row,
/// and finds no row. The condition counts the slot's live holds too
/// (`booking.held_seats`, read afresh on that re-check: see migration
/// `holds_moves_payments`). A booking that confirms a hold (`$19`) takes
/// the hold's seats instead, only while the hold is live (`hold_is_live`,
/// re-checked the same way), and marks it confirmed (`confirmed_hold`); an
/// erasure that released the hold meanwhile (it does not wait for the slot
/// row) leaves nothing to mark, and `hold_confirmed` then fails the whole
/// statement (SQLSTATE `MH001`, [`HOLD_LOST`]).
///
/// The idempotency key is checked first (`replay`): a key seen before writes
/// nothing, and the statement says whether the stored fingerprint matches.
/// The conversation's owner is checked next (`owner`): a conversation owned
/// by another customer takes no seat; an unowned one is claimed by the new
/// booking (`claim`). Two first bookings of one conversation at the same
/// instant cannot see each other's claim: the loser's claim conflicts, does
/// nothing, and the foreign key from bookings to owners fails its statement
/// whole (see `create`).
///
/// The reminder (`reminder`, `reminder_job`) is a follow-up of trigger
/// `pre_event` (`$26`) due `BOOKING_REMINDER_LEAD` (`$21` seconds; 0: none)
/// before the start, written only when that is still ahead, unrendered (its
/// first delivery renders it), with its first deliver job.
///
/// The job rows are the ones `apalis_postgres::queries::push_tasks` writes
/// (its `sink.sql`: same columns, status, ULID id, JSON payload), inserted
/// here so that the booking and its jobs commit together without more round
/// trips; the test `the_plan_job_row_matches_what_apalis_writes` keeps the
/// two in step.
///
/// A `pub const` run with `sqlx::query`, not a macro: the bench runs this
/// very text.
pub const CREATE: &str = r#"
WITH replay AS (
    SELECT request_fingerprint FROM booking.bookings WHERE customer_id = $2 AND request_id = $9
),
owner AS (
    SELECT customer_id FROM booking.conversation_owners WHERE conversation_id = $4
),
seats AS (
    UPDATE booking.slots SET booked = booked + $6
    WHERE id = $5 AND starts_at > $10
      AND NOT EXISTS (SELECT 1 FROM replay)
      AND NOT EXISTS (SELECT 1 FROM owner WHERE owner.customer_id <> $2)
      AND CASE WHEN $19::uuid IS NULL THEN booked + $6 + booking.held_seats(id) <= capacity
               ELSE booking.hold_is_live($19, $2) END
    RETURNING id, starts_at, ends_at, label, time_zone
),
new_booking AS (
    INSERT INTO booking.bookings
        (id, slot_id, customer_id, customer_name, conversation_id, party_size, state, request_id,
         created_at, request_fingerprint, followup_due_at)
    SELECT $1, seats.id, $2, $3, $4, $6, 1 /* booking::CONFIRMED */, $9, $10, $17,
           seats.ends_at + make_interval(secs => $18)
    FROM seats
    RETURNING id, followup_due_at
),
claim AS (
    INSERT INTO booking.conversation_owners (conversation_id, customer_id, created_at)
    SELECT $4, $2, $10 FROM new_booking
    WHERE $4::uuid IS NOT NULL AND NOT EXISTS (SELECT 1 FROM owner)
    ON CONFLICT (conversation_id) DO NOTHING
),
payment AS (
    INSERT INTO booking.payments (id, booking_id, state, currency, amount_minor, created_at, updated_at)
    SELECT $11, new_booking.id, 1 /* booking::PAYMENT_PENDING */, $7, $8, $10, $10 FROM new_booking
    RETURNING id
),
confirmed_hold AS (
    UPDATE booking.holds h SET booking_id = new_booking.id
    FROM new_booking
    WHERE h.id = $19 AND h.customer_id = $2 AND h.booking_id IS NULL AND h.released_at IS NULL
    RETURNING h.id
),
reminder AS (
    INSERT INTO booking.scheduled_followups
        (id, booking_id, customer_id, conversation_id, trigger, template_key, rendered_text,
         state, scheduled_at, created_at, updated_at)
    SELECT $20, new_booking.id, $2, $4, $26, '', '', 1 /* followups::PENDING */,
           seats.starts_at - make_interval(secs => $21), $10, $10
    FROM new_booking, seats
    WHERE $21 > 0 AND seats.starts_at - make_interval(secs => $21) > $10
    RETURNING id, scheduled_at
),
reminder_job AS (
    INSERT INTO apalis.jobs
        (id, job_type, job, status, attempts, max_attempts, run_at, priority, metadata, idempotency_key)
    SELECT $22, $25, $23, 'Pending', 0, $15, reminder.scheduled_at, 0, ''::hstore, $24
    FROM reminder
    RETURNING id
),
plan_job AS (
    INSERT INTO apalis.jobs
        (id, job_type, job, status, attempts, max_attempts, run_at, priority, metadata, idempotency_key)
    SELECT $12, $13, $14, 'Pending', 0, $15, new_booking.followup_due_at, 0, ''::hstore, $16
    FROM new_booking
    RETURNING id
)
SELECT seats.starts_at, seats.ends_at, seats.label, seats.time_zone, 'created' AS outcome
FROM seats, new_booking, payment, plan_job
WHERE booking.hold_confirmed($19, (SELECT count(*) FROM confirmed_hold), new_booking.id)
UNION ALL
SELECT NULL, NULL, NULL, NULL,
       CASE WHEN replay.request_fingerprint IS NULL OR replay.request_fingerprint = $17
            THEN 'replayed' ELSE 'reused' END
FROM replay
UNION ALL
SELECT NULL, NULL, NULL, NULL, 'foreign_conversation'
FROM owner WHERE owner.customer_id <> $2 AND NOT EXISTS (SELECT 1 FROM replay)
"#;

/// The SQLSTATE of a ConfirmHold whose hold was released between its seat
/// check and its mark (see CREATE): nothing was written.
pub const HOLD_LOST: &str = "MH001";

/// The constraint that fails a booking whose conversation another
/// customer's concurrent booking claimed first.
const CONVERSATION_OWNER_FKEY: &str = "bookings_conversation_owner_fkey";

/// Why no seats were taken: unknown slot, full (free seats: not booked,
/// not held), or already started.
pub(crate) const SLOT_STATE: &str = r#"
SELECT capacity - booked - booking.held_seats(id), starts_at FROM booking.slots WHERE id = $1
"#;

// The three reads of a [`BookingRow`] keep `sqlx::query_as` with raw
// strings: the row is read by hand (`BookingRow`'s `FromRow`, for the slot's
// time zone), which the macros cannot call.
const GET: &str = r#"
SELECT b.id, b.slot_id, b.customer_id, b.customer_name, b.conversation_id, b.party_size,
       b.state, b.request_id, b.created_at, b.cancelled_at,
       s.starts_at AS slot_starts_at, s.ends_at AS slot_ends_at, s.label AS slot_label,
       s.time_zone AS slot_time_zone,
       p.id AS payment_id, p.state AS payment_state, p.currency, p.amount_minor,
       p.provider_reference, p.paid_at
FROM booking.bookings b
JOIN booking.slots s ON s.id = b.slot_id
JOIN booking.payments p ON p.booking_id = b.id
WHERE b.id = $1
"#;
/// The customer's booking for a key, and the fingerprint it was made with.
const BY_REQUEST_ID: &str = r#"
SELECT b.id, b.slot_id, b.customer_id, b.customer_name, b.conversation_id, b.party_size,
       b.state, b.request_id, b.created_at, b.cancelled_at,
       s.starts_at AS slot_starts_at, s.ends_at AS slot_ends_at, s.label AS slot_label,
       s.time_zone AS slot_time_zone,
       p.id AS payment_id, p.state AS payment_state, p.currency, p.amount_minor,
       p.provider_reference, p.paid_at, b.request_fingerprint
FROM booking.bookings b
JOIN booking.slots s ON s.id = b.slot_id
JOIN booking.payments p ON p.booking_id = b.id
WHERE b.customer_id = $1 AND b.request_id = $2
"#;
const LIST_FOR_CUSTOMER: &str = r#"
SELECT b.id, b.slot_id, b.customer_id, b.customer_name, b.conversation_id, b.party_size,
       b.state, b.request_id, b.created_at, b.cancelled_at,
       s.starts_at AS slot_starts_at, s.ends_at AS slot_ends_at, s.label AS slot_label,
       s.time_zone AS slot_time_zone,
       p.id AS payment_id, p.state AS payment_state, p.currency, p.amount_minor,
       p.provider_reference, p.paid_at
FROM booking.bookings b
JOIN booking.slots s ON s.id = b.slot_id
JOIN booking.payments p ON p.booking_id = b.id
WHERE b.customer_id = $1 AND b.id < $2
ORDER BY b.id DESC
LIMIT $3
"#;

/// What the CreateBooking statement answers: the slot's values when it
/// booked, else only why not.
type CreateRow = (
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
    Option<String>,
    Option<String>,
    String,
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
    times: &LifecycleTimes,
    trace_parent: Option<String>,
) -> Result<CreateOutcome, sqlx::Error> {
    let reminder_id = Uuid::now_v7();
    let reminder = jobs::deliver_job_row(&DeliverFollowUp {
        follow_up_id: reminder_id,
        attempt: 1,
        trace_parent: trace_parent.clone(),
    })?;
    let plan = jobs::plan_job_row(&PlanFollowUp {
        booking_id,
        attempt: 1,
        trace_parent,
    })?;
    // A second run only after the conversation-owner race (see CREATE): the
    // first run wrote nothing, and the second sees the winner's claim.
    let mut lost_owner_race = false;
    let row = loop {
        let result = sqlx::query_as::<_, CreateRow>(CREATE)
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
            .bind(&booking.fingerprint)
            .bind(times.followup_delay.as_secs_f64())
            .bind(booking.hold_id)
            .bind(reminder_id)
            .bind(times.reminder_lead.as_secs_f64())
            .bind(&reminder.id)
            .bind(&reminder.payload)
            .bind(&reminder.idempotency_key)
            .bind(DELIVER_QUEUE)
            .bind(PRE_EVENT_TRIGGER)
            .fetch_optional(pool)
            .traced("bookings::CREATE")
            .await;
        match result {
            Ok(row) => break row,
            // Two concurrent first calls with one request_id: the loser's
            // statement failed whole (no seat taken); answer with the winner's.
            Err(sqlx::Error::Database(e)) if e.constraint() == Some("bookings_request_id_key") => {
                return replay(pool, booking).await;
            }
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some(HOLD_LOST) => {
                return Ok(CreateOutcome::HoldLost);
            }
            Err(sqlx::Error::Database(e)) if e.constraint() == Some(CONVERSATION_OWNER_FKEY) => {
                if lost_owner_race {
                    return Ok(CreateOutcome::ConversationOfAnotherCustomer);
                }
                lost_owner_race = true;
            }
            Err(e) => return Err(e),
        }
    };
    match row {
        Some((_, _, _, _, outcome)) if outcome == "replayed" => replay(pool, booking).await,
        Some((_, _, _, _, outcome)) if outcome == "reused" => Ok(CreateOutcome::RequestIdReused),
        Some((_, _, _, _, outcome)) if outcome == "foreign_conversation" => {
            Ok(CreateOutcome::ConversationOfAnotherCustomer)
        }
        Some((Some(slot_starts_at), Some(slot_ends_at), Some(slot_label), Some(zone), _)) => {
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
                slot_starts_at: slot_starts_at.with_timezone(&stored_time_zone(&zone)),
                slot_ends_at,
                slot_label,
                payment_id,
                payment_state: PAYMENT_PENDING,
                currency: booking.deposit_currency.clone(),
                amount_minor: booking.deposit_minor,
                provider_reference: None,
                paid_at: None,
            }))
        }
        _ => {
            // A concurrent twin of this call may have booked with this key
            // while this one waited for the slot row: then it is a replay.
            if let Some(outcome) = replay_if_used(pool, booking).await? {
                return Ok(outcome);
            }
            let state = sqlx::query_as::<_, (i32, DateTime<Utc>)>(SLOT_STATE)
                .bind(booking.slot_id)
                .fetch_optional(pool)
                .traced("bookings::SLOT_STATE")
                .await?;
            Ok(match state {
                None => CreateOutcome::SlotNotFound,
                Some((_, starts_at)) if starts_at <= now => CreateOutcome::SlotStarted,
                Some((available, _)) => CreateOutcome::SlotFull { available },
            })
        }
    }
}

#[derive(sqlx::FromRow)]
struct KeyedBooking {
    #[sqlx(flatten)]
    booking: BookingRow,
    request_fingerprint: Option<Vec<u8>>,
}

/// The answer to a key seen before: the first booking if the request is
/// the same, else a refusal.
pub async fn replay(pool: &PgPool, booking: &NewBooking) -> Result<CreateOutcome, sqlx::Error> {
    replay_if_used(pool, booking)
        .await?
        .ok_or(sqlx::Error::RowNotFound)
}

/// [`replay`]'s answer if the customer used the key, else None.
pub async fn replay_if_used(
    pool: &PgPool,
    booking: &NewBooking,
) -> Result<Option<CreateOutcome>, sqlx::Error> {
    let earlier = sqlx::query_as::<_, KeyedBooking>(BY_REQUEST_ID)
        .bind(&booking.customer_id)
        .bind(&booking.request_id)
        .fetch_optional(pool)
        .traced("bookings::BY_REQUEST_ID")
        .await?;
    Ok(earlier.map(|earlier| {
        if same_request(earlier.request_fingerprint.as_deref(), &booking.fingerprint) {
            CreateOutcome::Replayed(earlier.booking)
        } else {
            CreateOutcome::RequestIdReused
        }
    }))
}

#[tracing::instrument(skip(pool))]
pub async fn get(pool: &PgPool, id: Uuid) -> Result<Option<BookingRow>, sqlx::Error> {
    sqlx::query_as::<_, BookingRow>(GET)
        .bind(id)
        .fetch_optional(pool)
        .traced("bookings::GET")
        .await
}

/// A page of a customer's bookings, newest first, plus one extra row.
#[tracing::instrument(skip_all)]
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
/// all or nothing. Only a CONFIRMED booking whose slot has not started
/// changes, so a second cancel releases nothing, and a cancel after the
/// event began changes nothing at all (the seats were used, the deposit is
/// owed, the follow-up is due). Answers whether the booking exists, its
/// slot, whether it was refused for having started, and how many follow-ups
/// were cancelled. (Raw, not a macro: the data-modifying CTEs' columns infer
/// as nullable.)
const CANCEL: &str = r#"
WITH target AS (
    SELECT b.id, b.slot_id, b.state = 1 /* booking::CONFIRMED */ AND s.starts_at <= $2 AS started
    FROM booking.bookings b JOIN booking.slots s ON s.id = b.slot_id
    WHERE b.id = $1
),
cancelled AS (
    UPDATE booking.bookings b
    SET state = 2 /* booking::CANCELLED */, cancelled_at = $2, cancel_reason = NULLIF($3, '')
    FROM target t
    WHERE b.id = t.id AND b.state = 1 /* booking::CONFIRMED */ AND NOT t.started
    RETURNING b.id, b.slot_id, b.party_size
),
seats AS (
    UPDATE booking.slots s SET booked = s.booked - c.party_size
    FROM cancelled c WHERE s.id = c.slot_id
    RETURNING s.id
),
payment AS (
    UPDATE booking.payments p
    SET state = CASE WHEN p.state = 2 /* booking::PAYMENT_PAID */
                     THEN 4 /* booking::PAYMENT_REFUND_PENDING */
                     ELSE 3 /* booking::PAYMENT_VOIDED */ END,
        updated_at = $2
    FROM cancelled c
    WHERE p.booking_id = c.id
      AND p.state IN (1 /* booking::PAYMENT_PENDING */, 2 /* booking::PAYMENT_PAID */)
    RETURNING p.id
),
followups AS (
    UPDATE booking.scheduled_followups f SET state = 3 /* followups::CANCELLED */, updated_at = $2
    FROM cancelled c WHERE f.booking_id = c.id AND f.state = 1 /* followups::PENDING */
    RETURNING f.id
)
SELECT t.slot_id, t.started, (SELECT count(*) FROM followups)::int
FROM target t
"#;

/// What CancelBooking did.
#[derive(Debug, Clone, PartialEq)]
pub enum CancelOutcome {
    NotFound,
    /// The booking is confirmed and its slot has started: nothing changed.
    SlotStarted {
        slot_id: Uuid,
    },
    /// Cancelled now (with this many follow-ups) or before (0 follow-ups).
    Cancelled {
        follow_ups_cancelled: i32,
    },
}

#[tracing::instrument(skip(pool, reason))]
pub async fn cancel(
    pool: &PgPool,
    id: Uuid,
    reason: &str,
    now: DateTime<Utc>,
) -> Result<CancelOutcome, sqlx::Error> {
    let row = sqlx::query_as::<_, (Uuid, bool, i32)>(CANCEL)
        .bind(id)
        .bind(now)
        .bind(reason)
        .fetch_optional(pool)
        .await?;
    Ok(match row {
        None => CancelOutcome::NotFound,
        Some((slot_id, true, _)) => CancelOutcome::SlotStarted { slot_id },
        Some((_, false, follow_ups_cancelled)) => CancelOutcome::Cancelled {
            follow_ups_cancelled,
        },
    })
}

//! Moving a booking to another slot (MoveBooking).

use chrono::{DateTime, Utc};
use maitre_runtime::otel::TracedStatement;
use sqlx::PgPool;
use uuid::Uuid;

use super::jobs;
use crate::domain::{
    PRE_EVENT_TRIGGER,
    booking::{BookingMove, LifecycleTimes},
    followup_jobs::{DELIVER_QUEUE, DeliverFollowUp, PLAN_QUEUE},
    idempotency::same_request,
};

/// The move in one statement: either the seats, the booking, its follow-up
/// job and the key all change, or nothing does.
///
/// - `replay`: the key seen before writes nothing.
/// - `booking`: the booking, locked first (as CancelBooking does), so a
///   cancel or another move of it runs wholly before or after this one;
///   only a CONFIRMED booking not already in the target moves.
/// - `locked`: both slot rows, locked in id order, so two moves in opposite
///   directions queue up instead of deadlocking (and a deadlock anyway is
///   retried by [`move_booking`]).
/// - `target`: the seats taken in the new slot, checked like every seat
///   taker's (`booked + n + held_seats <= capacity`, re-checked on the
///   newest row: see migration `holds_moves_payments`), only if neither
///   slot has started.
/// - `source`: the seats given back in the old slot, only if `target` took
///   them.
/// - `moved`, `plan_job`: the booking points at the new slot, and its
///   follow-up's plan job (`<booking id>/<plan_attempt>`, still pending:
///   nothing of it runs before the old event has ended) comes due at the new
///   event's end + `$5` seconds.
/// - `reminder`, `reminder_job`: a PENDING reminder not on its way (also
///   one retrying after a failed attempt: each attempt words it afresh)
///   moves to `BOOKING_REMINDER_LEAD` (`$8` seconds) before the new start
///   with its next deliver job (`<id>/<attempts + 1>`), or is CANCELLED when
///   that is not ahead any more (`$16` says why). One on its way may still
///   go out, worded for the new event; one SENT is not sent again, one
///   FAILED waits for its re-drive.
/// - `new_reminder`, `new_reminder_job`: a booking without a live reminder
///   (booked inside the lead, or its reminder skipped by an earlier move)
///   gets one when the new start is far enough ahead.
pub const MOVE: &str = r#"
WITH replay AS (
    SELECT request_fingerprint FROM booking.moves WHERE booking_id = $1 AND request_id = $3
),
booking AS (
    SELECT b.id, b.slot_id, b.party_size, b.plan_attempt
    FROM booking.bookings b
    WHERE b.id = $1 AND b.state = 1 /* booking::CONFIRMED */ AND b.slot_id <> $2
      AND NOT EXISTS (SELECT 1 FROM replay)
    FOR UPDATE
),
locked AS (
    SELECT s.id, s.starts_at FROM booking.slots s
    WHERE (s.id = $2 OR s.id = (SELECT slot_id FROM booking))
      AND EXISTS (SELECT 1 FROM booking)
    ORDER BY s.id
    FOR UPDATE
),
target AS (
    UPDATE booking.slots s SET booked = s.booked + b.party_size
    FROM booking b
    WHERE s.id = $2 AND s.starts_at > $4
      AND (SELECT count(*) FROM locked WHERE locked.starts_at > $4) = 2
      AND s.booked + b.party_size + booking.held_seats(s.id) <= s.capacity
    RETURNING s.id, s.starts_at, s.ends_at
),
source AS (
    UPDATE booking.slots s SET booked = s.booked - b.party_size
    FROM booking b, target
    WHERE s.id = b.slot_id
    RETURNING s.id
),
moved AS (
    UPDATE booking.bookings b
    SET slot_id = target.id, followup_due_at = target.ends_at + make_interval(secs => $5)
    FROM target, source
    WHERE b.id = $1
    RETURNING b.id, b.plan_attempt, b.followup_due_at, b.customer_id, b.conversation_id
),
plan_job AS (
    UPDATE apalis.jobs j SET run_at = moved.followup_due_at
    FROM moved
    WHERE j.job_type = $6 AND j.idempotency_key = moved.id::text || '/' || moved.plan_attempt
      AND j.status = 'Pending'
    RETURNING j.id
),
reminder AS (
    UPDATE booking.scheduled_followups f
    SET scheduled_at = CASE WHEN $8 > 0 AND target.starts_at - make_interval(secs => $8) > $4
                            THEN target.starts_at - make_interval(secs => $8)
                            ELSE f.scheduled_at END,
        state = CASE WHEN $8 > 0 AND target.starts_at - make_interval(secs => $8) > $4
                     THEN f.state ELSE 3 /* followups::CANCELLED */ END,
        last_error = CASE WHEN $8 > 0 AND target.starts_at - make_interval(secs => $8) > $4
                          THEN f.last_error ELSE $16 END,
        updated_at = $4
    FROM moved, target
    WHERE f.booking_id = $1 AND f.trigger = $14 AND f.state = 1 /* followups::PENDING */
      AND (f.claimed_until IS NULL OR f.claimed_until < now())
    RETURNING f.id, f.state, f.scheduled_at, f.attempts
),
reminder_job AS (
    UPDATE apalis.jobs j SET run_at = reminder.scheduled_at
    FROM reminder
    WHERE j.job_type = $13
      AND j.idempotency_key = reminder.id::text || '/' || (reminder.attempts + 1)
      AND j.status = 'Pending' AND reminder.state = 1 /* followups::PENDING */
    RETURNING j.id
),
new_reminder AS (
    INSERT INTO booking.scheduled_followups
        (id, booking_id, customer_id, conversation_id, trigger, template_key, rendered_text,
         state, scheduled_at, created_at, updated_at)
    SELECT $9, moved.id, moved.customer_id, moved.conversation_id, $14, '', '',
           1 /* followups::PENDING */, target.starts_at - make_interval(secs => $8), $4, $4
    FROM moved, target
    WHERE $8 > 0 AND target.starts_at - make_interval(secs => $8) > $4
      AND NOT EXISTS (SELECT 1 FROM booking.scheduled_followups f
                      WHERE f.booking_id = $1 AND f.trigger = $14
                        AND f.state <> 3 /* followups::CANCELLED */)
    ON CONFLICT (booking_id, trigger) WHERE state <> 3 /* followups::CANCELLED */ DO NOTHING
    RETURNING id, scheduled_at
),
new_reminder_job AS (
    INSERT INTO apalis.jobs
        (id, job_type, job, status, attempts, max_attempts, run_at, priority, metadata, idempotency_key)
    SELECT $10, $13, $11, 'Pending', 0, $15, new_reminder.scheduled_at, 0, ''::hstore, $12
    FROM new_reminder
    RETURNING id
),
record AS (
    INSERT INTO booking.moves
        (booking_id, request_id, from_slot_id, to_slot_id, request_fingerprint, moved_at)
    SELECT $1, $3, booking.slot_id, $2, $7, $4 FROM booking, moved
    RETURNING booking_id
)
SELECT 'moved', moved.followup_due_at, target.starts_at FROM moved, record, target
UNION ALL
SELECT CASE WHEN replay.request_fingerprint = $7 THEN 'replayed' ELSE 'reused' END, NULL, NULL
FROM replay
"#;

/// What MoveBooking did.
#[derive(Debug, Clone, PartialEq)]
pub enum MoveOutcome {
    /// Moved now; the follow-up's plan job is due then, the new event
    /// starts then.
    Moved {
        followup_due_at: DateTime<Utc>,
        starts_at: DateTime<Utc>,
    },
    /// The key was seen before with the same target: nothing written.
    Replayed,
    RequestIdReused,
    /// Nothing moved: the caller reads the booking and the slots to say why.
    NotMoved,
}

/// What the move statement answers: the outcome, and for a move the
/// follow-up's new due time and the new event's start.
type MoveRow = (String, Option<DateTime<Utc>>, Option<DateTime<Utc>>);

/// Runs before a deadlock is the caller's error.
const ATTEMPTS: u32 = 3;

/// The `last_error` of a reminder a move brought inside the lead time.
pub const REMINDER_SKIPPED: &str =
    "REMINDER_SKIPPED: the booking moved to a slot starting within BOOKING_REMINDER_LEAD";

/// Moves a booking; `times` as CreateBooking's.
#[tracing::instrument(skip_all, fields(booking_id = %request.booking_id, slot_id = %request.to_slot_id))]
pub async fn move_booking(
    pool: &PgPool,
    request: &BookingMove,
    now: DateTime<Utc>,
    times: &LifecycleTimes,
) -> Result<MoveOutcome, sqlx::Error> {
    let reminder_id = Uuid::now_v7();
    let reminder_job = jobs::deliver_job_row(&DeliverFollowUp {
        follow_up_id: reminder_id,
        attempt: 1,
        trace_parent: None,
    })?;
    let mut attempt = 1;
    let row = loop {
        let result = move_once(pool, request, now, times, reminder_id, &reminder_job).await;
        match result {
            Ok(row) => break row,
            // A concurrent first use of the key won: answer as a replay.
            Err(sqlx::Error::Database(e)) if e.constraint() == Some("moves_pkey") => {
                return replay(pool, request).await;
            }
            Err(sqlx::Error::Database(e))
                if e.code().as_deref() == Some("40P01") && attempt < ATTEMPTS =>
            {
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    };
    match row {
        Some((outcome, Some(followup_due_at), Some(starts_at))) if outcome == "moved" => {
            Ok(MoveOutcome::Moved {
                followup_due_at,
                starts_at,
            })
        }
        Some((outcome, _, _)) if outcome == "replayed" => Ok(MoveOutcome::Replayed),
        Some((outcome, _, _)) if outcome == "reused" => Ok(MoveOutcome::RequestIdReused),
        // A concurrent twin of this call with the same key may have moved
        // the booking while this one waited for it: then this is a replay.
        _ => replay(pool, request).await,
    }
}

/// One run of the move, in its own transaction: the booking is locked by a
/// statement of its own first, so that MOVE's snapshot, taken after that
/// lock is granted, sees whatever an earlier move or cancel of the booking
/// committed (its reminder above all); in one statement alone, a move that
/// waited for another would re-read only the rows it had already found.
async fn move_once(
    pool: &PgPool,
    request: &BookingMove,
    now: DateTime<Utc>,
    times: &LifecycleTimes,
    reminder_id: Uuid,
    reminder_job: &jobs::JobRow,
) -> Result<Option<MoveRow>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT 1 FROM booking.bookings WHERE id = $1 FOR UPDATE")
        .bind(request.booking_id)
        .execute(&mut *tx)
        .traced("moves::LOCK_BOOKING")
        .await?;
    let row = sqlx::query_as::<_, MoveRow>(MOVE)
        .bind(request.booking_id)
        .bind(request.to_slot_id)
        .bind(&request.request_id)
        .bind(now)
        .bind(times.followup_delay.as_secs_f64())
        .bind(PLAN_QUEUE)
        .bind(&request.fingerprint)
        .bind(times.reminder_lead.as_secs_f64())
        .bind(reminder_id)
        .bind(&reminder_job.id)
        .bind(&reminder_job.payload)
        .bind(&reminder_job.idempotency_key)
        .bind(DELIVER_QUEUE)
        .bind(PRE_EVENT_TRIGGER)
        .bind(reminder_job.max_attempts)
        .bind(REMINDER_SKIPPED)
        .fetch_optional(&mut *tx)
        .traced("moves::MOVE")
        .await?;
    tx.commit().await?;
    Ok(row)
}

/// The answer to a key that may have been used: a replay, a refusal, or
/// (unused) nothing moved.
async fn replay(pool: &PgPool, request: &BookingMove) -> Result<MoveOutcome, sqlx::Error> {
    let stored = sqlx::query_scalar::<_, Vec<u8>>(
        "SELECT request_fingerprint FROM booking.moves WHERE booking_id = $1 AND request_id = $2",
    )
    .bind(request.booking_id)
    .bind(&request.request_id)
    .fetch_optional(pool)
    .await?;
    Ok(match stored {
        None => MoveOutcome::NotMoved,
        Some(stored) if same_request(Some(&stored), &request.fingerprint) => MoveOutcome::Replayed,
        Some(_) => MoveOutcome::RequestIdReused,
    })
}

/// The target slot's free seats and start, for the refusal (None: no such
/// slot).
pub async fn slot_state(
    pool: &PgPool,
    slot_id: Uuid,
) -> Result<Option<(i32, DateTime<Utc>)>, sqlx::Error> {
    sqlx::query_as::<_, (i32, DateTime<Utc>)>(super::bookings::SLOT_STATE)
        .bind(slot_id)
        .fetch_optional(pool)
        .traced("bookings::SLOT_STATE")
        .await
}

//! Scheduled follow-ups: planning inserts them, delivery claims and
//! finishes them (claim, call, finish: no lock or connection is held across
//! the call to memory-service), RetryFollowUp re-drives the failed ones,
//! ListFollowUps reads them.

use chrono::{DateTime, Utc};
use maitre_runtime::otel::{self, Recorder, TracedStatement};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::rows::FollowUpRow;
use crate::domain::{PRE_EVENT_TRIGGER, booking::FollowUpPage};

/// Follow-up states, stored as the proto enum's numbers. In SQL they are
/// literals marked `/* followups::NAME */` (the partial indexes and the
/// ON CONFLICT arbiter match literals only); a test checks each marker.
pub const PENDING: i16 = 1;
pub const SENT: i16 = 2;
pub const CANCELLED: i16 = 3;
pub const FAILED: i16 = 4;

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

/// Inserts the follow-up and records that the booking's planning is over,
/// in one statement (no transaction round trips on the hot path). The row
/// is inserted unless one is already live for this booking and trigger (the
/// partial unique index decides, not a lookup), and only while the booking
/// is still confirmed; planning is recorded as over either way (a racing
/// run planned it, or the booking was cancelled meanwhile).
///
/// The booking row is locked first (`FOR NO KEY UPDATE`): a cancel in
/// flight is waited for and its outcome re-checked, so a cancelled booking
/// never gets a PENDING follow-up the cancel could not see; two runs of the
/// same job queue up on it instead of deadlocking between the trigger's
/// share lock and the planned mark. An erasure in progress is waited for
/// too (it locks the booking `FOR UPDATE`), and then the trigger
/// `followup_of_erased_booking` gives the row born CANCELLED and unclaimed.
///
/// With `claim` (token, lease) the row is born claimed for its first
/// delivery attempt by the run that planned it, which delivers it next: no
/// claim statement, and the stranded-delivery sweep leaves it alone while
/// the lease lasts. Returns the inserted row's state, none when nothing was
/// inserted.
pub async fn insert_planned(
    conn: &mut PgConnection,
    f: &NewFollowUp,
    now: DateTime<Utc>,
    claim: Option<(Uuid, std::time::Duration)>,
) -> Result<Option<i16>, sqlx::Error> {
    let (token, lease) = claim.unzip();
    sqlx::query_scalar!(
        r#"
WITH inserted AS (
    INSERT INTO booking.scheduled_followups
        (id, booking_id, customer_id, conversation_id, trigger, template_key, rendered_text,
         state, scheduled_at, plan_attempts, created_at, updated_at, claim_token, claimed_until)
    SELECT $1, $2, $3, $4, $5, $6, $7, 1 /* followups::PENDING */, $8, $9, $10, $10,
           $11::uuid, CASE WHEN $11::uuid IS NOT NULL THEN now() + make_interval(secs => $12) END
    FROM booking.bookings b
    WHERE b.id = $2 AND b.state = 1 /* booking::CONFIRMED */
    FOR NO KEY UPDATE OF b
    ON CONFLICT (booking_id, trigger) WHERE state <> 3 /* followups::CANCELLED */ DO NOTHING
    RETURNING state
),
planned AS (
    UPDATE booking.bookings SET followup_planned_at = $10
    WHERE id = $2 AND followup_planned_at IS NULL
)
SELECT state AS "state!" FROM inserted
"#,
        f.id,
        f.booking_id,
        f.customer_id,
        f.conversation_id,
        f.trigger,
        f.template_key,
        f.rendered_text,
        f.scheduled_at,
        f.plan_attempts,
        now,
        token,
        lease.map(|l| l.as_secs_f64()),
    )
    .fetch_optional(&mut *conn)
    .traced("followups::insert_planned")
    .await
}

/// [`insert_planned`] with a claim, for many follow-ups of different
/// bookings in one statement (the follow-up jobs that come due together),
/// each born claimed by its own run's token for `lease`, with the same
/// outcome per row. Instead of a separate lock, the planned mark is the
/// statement's first write: it locks each booking (waiting for a cancel or
/// an erasure in flight, as the one-row statement does, for as long as the
/// caller's `lock_timeout` lets it) and returns the booking's state as it is
/// then. `batch` must hold one follow-up per booking and trigger. Returns
/// the inserted follow-ups' ids and states; a follow-up missing from the
/// answer was not inserted (already planned, or the booking no longer
/// confirmed), exactly when [`insert_planned`] would answer none.
pub async fn insert_claimed_many(
    conn: &mut PgConnection,
    batch: &[(NewFollowUp, Uuid)],
    now: DateTime<Utc>,
    lease: std::time::Duration,
    recorders: &[Recorder],
) -> Result<Vec<(Uuid, i16)>, sqlx::Error> {
    if batch.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Uuid> = batch.iter().map(|(f, _)| f.id).collect();
    let booking_ids: Vec<Uuid> = batch.iter().map(|(f, _)| f.booking_id).collect();
    let customer_ids: Vec<&str> = batch.iter().map(|(f, _)| f.customer_id.as_str()).collect();
    let conversation_ids: Vec<Option<Uuid>> =
        batch.iter().map(|(f, _)| f.conversation_id).collect();
    let template_keys: Vec<&str> = batch.iter().map(|(f, _)| f.template_key.as_str()).collect();
    let texts: Vec<&str> = batch
        .iter()
        .map(|(f, _)| f.rendered_text.as_str())
        .collect();
    let scheduled: Vec<DateTime<Utc>> = batch.iter().map(|(f, _)| f.scheduled_at).collect();
    let attempts: Vec<i32> = batch.iter().map(|(f, _)| f.plan_attempts).collect();
    let tokens: Vec<Uuid> = batch.iter().map(|(_, token)| *token).collect();
    let triggers: Vec<&str> = batch.iter().map(|(f, _)| f.trigger).collect();
    let statement = sqlx::query_as::<_, (Uuid, i16)>(INSERT_CLAIMED_MANY)
        .bind(ids)
        .bind(booking_ids)
        .bind(customer_ids)
        .bind(conversation_ids)
        .bind(template_keys)
        .bind(texts)
        .bind(scheduled)
        .bind(attempts)
        .bind(tokens)
        .bind(triggers)
        .bind(now)
        .bind(lease.as_secs_f64())
        .fetch_all(conn);
    otel::sql_batch(
        recorders,
        "followups::INSERT_CLAIMED_MANY",
        batch.len(),
        statement,
    )
    .await
}

/// The statement of [`insert_claimed_many`], one array per column (element
/// `i` is follow-up `i`), `$11` now, `$12` the lease in seconds. A
/// booking's planning is recorded as over whether or not its row was
/// inserted, as in [`insert_planned`].
const INSERT_CLAIMED_MANY: &str = r#"
WITH input AS (
    SELECT *
    FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::uuid[], $5::text[], $6::text[],
                $7::timestamptz[], $8::int4[], $9::uuid[], $10::text[])
         AS i(id, booking_id, customer_id, conversation_id, template_key, rendered_text,
              scheduled_at, plan_attempts, claim_token, trigger)
),
planned AS (
    UPDATE booking.bookings b SET followup_planned_at = COALESCE(b.followup_planned_at, $11)
    FROM input i
    WHERE b.id = i.booking_id
    RETURNING b.id, b.state
)
INSERT INTO booking.scheduled_followups
    (id, booking_id, customer_id, conversation_id, trigger, template_key, rendered_text,
     state, scheduled_at, plan_attempts, created_at, updated_at, claim_token, claimed_until)
SELECT i.id, i.booking_id, i.customer_id, i.conversation_id, i.trigger, i.template_key,
       i.rendered_text, 1 /* followups::PENDING */, i.scheduled_at, i.plan_attempts, $11, $11,
       i.claim_token, now() + make_interval(secs => $12)
FROM input i
JOIN planned p ON p.id = i.booking_id AND p.state = 1 /* booking::CONFIRMED */
ON CONFLICT (booking_id, trigger) WHERE state <> 3 /* followups::CANCELLED */ DO NOTHING
RETURNING id, state
"#;

/// The live (not cancelled) follow-up of a booking for a trigger, as a
/// re-run of its plan job needs it: whether its first delivery is still
/// to be made.
#[derive(Debug, Clone)]
pub struct Live {
    pub id: Uuid,
    pub state: i16,
    pub attempts: i32,
    pub scheduled_at: DateTime<Utc>,
}

pub async fn live_for_booking(
    pool: &PgPool,
    booking_id: Uuid,
    trigger: &str,
) -> Result<Option<Live>, sqlx::Error> {
    sqlx::query_as!(
        Live,
        r#"
SELECT id, state, attempts, scheduled_at
FROM booking.scheduled_followups
WHERE booking_id = $1 AND trigger = $2 AND state <> 3 /* followups::CANCELLED */
"#,
        booking_id,
        trigger
    )
    .fetch_optional(pool)
    .traced("followups::live_for_booking")
    .await
}

/// A follow-up claimed for one delivery attempt: what the call needs.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: Uuid,
    pub booking_id: Uuid,
    /// `post_event` or `pre_event`: which templates word it.
    pub trigger: String,
    pub customer_id: String,
    pub conversation_id: Option<Uuid>,
    pub template_key: String,
    pub rendered_text: String,
    /// Attempts made before this one.
    pub attempts: i32,
    /// `attempts` when last re-driven: the attempt budget counts from there.
    pub retry_from: i32,
    /// The previous attempt's error, if any.
    pub last_error: Option<String>,
}

/// Claims attempt `attempts_made + 1` of a follow-up for `lease` under
/// `token`: only while it is PENDING, its booking CONFIRMED, no attempt was
/// made since the job was enqueued, and no other run holds an unexpired
/// claim; a reminder only once it is due (a MoveBooking may have put it
/// later after its job was fetched: the sweep enqueues it again then). One short statement: no lock outlives it, so nothing waits on the
/// delivery's network call (CancelBooking least of all).
pub async fn claim(
    pool: &PgPool,
    id: Uuid,
    attempts_made: i32,
    token: Uuid,
    lease: std::time::Duration,
) -> Result<Option<Claimed>, sqlx::Error> {
    sqlx::query_as!(
        Claimed,
        r#"
UPDATE booking.scheduled_followups f
SET claim_token = $2, claimed_until = now() + make_interval(secs => $3)
FROM booking.bookings b
WHERE f.id = $1 AND b.id = f.booking_id
  AND b.state = 1 /* booking::CONFIRMED */ AND b.erased_at IS NULL
  AND f.state = 1 /* followups::PENDING */ AND f.attempts = $4
  AND (f.claimed_until IS NULL OR f.claimed_until < now())
  AND (f.trigger <> $5 OR f.scheduled_at <= now())
RETURNING f.id AS "id!", f.booking_id AS "booking_id!", f.trigger AS "trigger!",
          f.customer_id AS "customer_id!", f.conversation_id, f.template_key AS "template_key!",
          f.rendered_text AS "rendered_text!", f.attempts AS "attempts!",
          f.retry_from AS "retry_from!", f.last_error
"#,
        id,
        token,
        lease.as_secs_f64(),
        attempts_made,
        PRE_EVENT_TRIGGER
    )
    .fetch_optional(pool)
    .traced("followups::claim")
    .await
}

/// Cancels a claimed follow-up with `reason`, only while the claim `token`
/// holds (a reminder whose event has started).
pub async fn cancel_claimed(
    pool: &PgPool,
    id: Uuid,
    token: Uuid,
    reason: &str,
) -> Result<bool, sqlx::Error> {
    let cancelled = sqlx::query!(
        r#"
UPDATE booking.scheduled_followups
SET state = 3 /* followups::CANCELLED */, last_error = $3, claim_token = NULL,
    claimed_until = NULL, updated_at = now()
WHERE id = $1 AND claim_token = $2 AND state = 1 /* followups::PENDING */
"#,
        id,
        token,
        reason
    )
    .execute(pool)
    .traced("followups::cancel_claimed")
    .await?;
    Ok(cancelled.rows_affected() == 1)
}

/// Gives up the claim `token` on a follow-up without recording an attempt
/// (a run that found nothing to deliver), so that it is not counted as a
/// delivery on its way for the rest of the lease.
pub async fn release_claim(pool: &PgPool, id: Uuid, token: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query!(
        r#"
UPDATE booking.scheduled_followups SET claim_token = NULL, claimed_until = NULL
WHERE id = $1 AND claim_token = $2
"#,
        id,
        token
    )
    .execute(pool)
    .traced("followups::release_claim")
    .await?;
    Ok(())
}

/// Records the wording of a claimed reminder, only while the claim `token`
/// holds.
pub async fn set_wording(
    pool: &PgPool,
    id: Uuid,
    token: Uuid,
    template_key: &str,
    rendered_text: &str,
) -> Result<bool, sqlx::Error> {
    let worded = sqlx::query!(
        r#"
UPDATE booking.scheduled_followups
SET template_key = $3, rendered_text = $4, updated_at = now()
WHERE id = $1 AND claim_token = $2 AND state = 1 /* followups::PENDING */
"#,
        id,
        token,
        template_key,
        rendered_text
    )
    .execute(pool)
    .traced("followups::set_wording")
    .await?;
    Ok(worded.rows_affected() == 1)
}

/// Why a claim was refused.
#[derive(Debug, Clone)]
pub struct Unclaimed {
    pub state: i16,
    pub attempts: i32,
    pub claimed_until: Option<DateTime<Utc>>,
    pub booking_state: i16,
}

pub async fn unclaimed(pool: &PgPool, id: Uuid) -> Result<Option<Unclaimed>, sqlx::Error> {
    sqlx::query_as!(
        Unclaimed,
        r#"
SELECT f.state, f.attempts, f.claimed_until, b.state AS booking_state
FROM booking.scheduled_followups f
JOIN booking.bookings b ON b.id = f.booking_id
WHERE f.id = $1
"#,
        id
    )
    .fetch_optional(pool)
    .traced("followups::unclaimed")
    .await
}

/// A PENDING follow-up whose booking is cancelled (a plan that raced the
/// cancel): CANCELLED, with the reason.
pub async fn cancel_for_cancelled_booking(
    pool: &PgPool,
    id: Uuid,
    now: DateTime<Utc>,
) -> Result<bool, sqlx::Error> {
    let cancelled = sqlx::query!(
        r#"
UPDATE booking.scheduled_followups f
SET state = 3 /* followups::CANCELLED */,
    last_error = 'BOOKING_CANCELLED: the booking was cancelled', updated_at = $2
FROM booking.bookings b
WHERE f.id = $1 AND b.id = f.booking_id
  AND b.state = 2 /* booking::CANCELLED */ AND f.state = 1 /* followups::PENDING */
"#,
        id,
        now
    )
    .execute(pool)
    .traced("followups::cancel_for_cancelled_booking")
    .await?;
    Ok(cancelled.rows_affected() == 1)
}

/// The `last_error` prefix of a follow-up stored after its booking was cancelled.
pub const SENT_AFTER_CANCEL: &str = "SENT_AFTER_CANCEL";
/// The whole `last_error` of such a follow-up (starts with [`SENT_AFTER_CANCEL`]).
pub(super) const SENT_AFTER_CANCEL_NOTE: &str = "SENT_AFTER_CANCEL: the booking was cancelled while this \
    follow-up was being delivered; the message was stored (message_id)";

/// Finishes a stored delivery, if the claim `token` still holds: PENDING →
/// SENT; a follow-up cancelled while the message was on its way stays
/// CANCELLED but records the stored message (`message_id`, `sent_at`, and a
/// `last_error` saying so), so that nothing stored is unaccounted for.
/// Returns the state it ended in; none when the claim was lost (the lease
/// ran out and another run claimed: that run finishes, with the same
/// message, memory-service answering its `request_id` with the first one).
pub async fn finish_sent(
    pool: &PgPool,
    id: Uuid,
    token: Uuid,
    message_id: Uuid,
    now: DateTime<Utc>,
) -> Result<Option<i16>, sqlx::Error> {
    sqlx::query_scalar!(
        r#"
UPDATE booking.scheduled_followups
SET state = CASE WHEN state = 1 /* followups::PENDING */ THEN 2 /* followups::SENT */
                 ELSE state END,
    last_error = CASE WHEN state = 1 /* followups::PENDING */ THEN NULL ELSE $5::text END,
    message_id = $3, sent_at = $4, updated_at = $4, attempts = attempts + 1,
    claim_token = NULL, claimed_until = NULL
WHERE id = $1 AND claim_token = $2
  AND state IN (1 /* followups::PENDING */, 3 /* followups::CANCELLED */)
RETURNING state AS "state!"
"#,
        id,
        token,
        message_id,
        now,
        SENT_AFTER_CANCEL_NOTE
    )
    .fetch_optional(pool)
    .traced("followups::finish_sent")
    .await
}

/// [`finish_sent`] for many claimed follow-ups in one statement: `(id,
/// token, message_id)` each, one per follow-up, with the same outcome per
/// row. Returns the finished ones' ids and states; one missing from the
/// answer lost its claim, exactly when [`finish_sent`] would answer none.
pub async fn finish_sent_many(
    conn: &mut PgConnection,
    batch: &[(Uuid, Uuid, Uuid)],
    now: DateTime<Utc>,
    recorders: &[Recorder],
) -> Result<Vec<(Uuid, i16)>, sqlx::Error> {
    let ids: Vec<Uuid> = batch.iter().map(|(id, _, _)| *id).collect();
    let tokens: Vec<Uuid> = batch.iter().map(|(_, token, _)| *token).collect();
    let message_ids: Vec<Uuid> = batch.iter().map(|(_, _, message)| *message).collect();
    let statement = sqlx::query!(
        r#"
WITH input AS (
    SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[]) AS i(id, token, message_id)
)
UPDATE booking.scheduled_followups f
SET state = CASE WHEN f.state = 1 /* followups::PENDING */ THEN 2 /* followups::SENT */
                 ELSE f.state END,
    last_error = CASE WHEN f.state = 1 /* followups::PENDING */ THEN NULL ELSE $5::text END,
    message_id = i.message_id, sent_at = $4, updated_at = $4, attempts = f.attempts + 1,
    claim_token = NULL, claimed_until = NULL
FROM input i
WHERE f.id = i.id AND f.claim_token = i.token
  AND f.state IN (1 /* followups::PENDING */, 3 /* followups::CANCELLED */)
RETURNING f.id, f.state
"#,
        &ids,
        &tokens,
        &message_ids,
        now,
        SENT_AFTER_CANCEL_NOTE
    )
    .fetch_all(conn);
    let rows = otel::sql_batch(
        recorders,
        "followups::finish_sent_many",
        batch.len(),
        statement,
    )
    .await?;
    Ok(rows.into_iter().map(|r| (r.id, r.state)).collect())
}

/// What a failed attempt leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFailure {
    /// Still PENDING, next attempt at this time.
    Retry(DateTime<Utc>),
    /// FAILED: the dead letter.
    Failed,
    /// CANCELLED: memory-service will never take it (conversation erased).
    Cancelled,
}

/// Records a failed attempt if the claim `token` still holds on a PENDING
/// follow-up: the count, the error, and the new state and time. Returns the
/// attempts made, none when the claim was lost or the follow-up was
/// cancelled meanwhile (nothing to record then).
pub async fn finish_failed_attempt(
    tx: &mut PgConnection,
    id: Uuid,
    token: Uuid,
    error: &str,
    after: AfterFailure,
    now: DateTime<Utc>,
) -> Result<Option<i32>, sqlx::Error> {
    let (state, next_at) = match after {
        AfterFailure::Retry(at) => (PENDING, Some(at)),
        AfterFailure::Failed => (FAILED, None),
        AfterFailure::Cancelled => (CANCELLED, None),
    };
    sqlx::query_scalar!(
        r#"
UPDATE booking.scheduled_followups
SET attempts = attempts + 1, last_error = $3, updated_at = $4, state = $5,
    scheduled_at = COALESCE($6, scheduled_at), claim_token = NULL, claimed_until = NULL
WHERE id = $1 AND claim_token = $2 AND state = 1 /* followups::PENDING */
RETURNING attempts AS "attempts!"
"#,
        id,
        token,
        error,
        now,
        state,
        next_at
    )
    .fetch_optional(&mut *tx)
    .traced("followups::finish_failed_attempt")
    .await
}

/// A follow-up as RetryFollowUp sees it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RedriveView {
    #[sqlx(flatten)]
    pub follow_up: FollowUpRow,
    pub booking_state: i16,
    pub redriven_at: Option<DateTime<Utc>>,
}

/// Raw, not a macro: the row nests a [`FollowUpRow`] (`#[sqlx(flatten)]`).
const REDRIVE_VIEW: &str = r#"
SELECT f.id, f.booking_id, f.customer_id, f.conversation_id, f.trigger, f.template_key,
       f.rendered_text, f.state, f.scheduled_at, f.attempts, f.last_error, f.message_id,
       f.created_at, f.sent_at, b.state AS booking_state, f.redriven_at
FROM booking.scheduled_followups f
JOIN booking.bookings b ON b.id = f.booking_id
WHERE f.id = $1
"#;

pub async fn redrive_view(pool: &PgPool, id: Uuid) -> Result<Option<RedriveView>, sqlx::Error> {
    sqlx::query_as::<_, RedriveView>(REDRIVE_VIEW)
        .bind(id)
        .fetch_optional(pool)
        .await
}

/// FAILED → PENDING with a fresh attempt budget (`retry_from` = attempts
/// made), due now, only while the booking is confirmed. Returns the attempts
/// made of each re-driven follow-up; the caller enqueues attempt + 1 in the
/// same transaction.
pub async fn redrive(
    tx: &mut PgConnection,
    ids: &[Uuid],
    now: DateTime<Utc>,
) -> Result<Vec<(Uuid, i32)>, sqlx::Error> {
    let rows = sqlx::query!(
        r#"
UPDATE booking.scheduled_followups f
SET state = 1 /* followups::PENDING */, retry_from = f.attempts, redriven_at = $2,
    redrives = f.redrives + 1, scheduled_at = $2, updated_at = $2,
    claim_token = NULL, claimed_until = NULL
FROM booking.bookings b
WHERE f.id = ANY($1) AND b.id = f.booking_id
  AND b.state = 1 /* booking::CONFIRMED */ AND b.erased_at IS NULL
  AND f.state = 4 /* followups::FAILED */
RETURNING f.id AS "id!", f.attempts AS "attempts!"
"#,
        ids,
        now
    )
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows.into_iter().map(|row| (row.id, row.attempts)).collect())
}

/// FAILED follow-ups of cancelled bookings → CANCELLED (they are never
/// re-driven: nobody is to be followed up). Returns how many.
pub async fn cancel_failed_of_cancelled_bookings(
    tx: &mut PgConnection,
    ids: &[Uuid],
    now: DateTime<Utc>,
) -> Result<u64, sqlx::Error> {
    let cancelled = sqlx::query!(
        r#"
UPDATE booking.scheduled_followups f
SET state = 3 /* followups::CANCELLED */, updated_at = $2,
    last_error = 'BOOKING_CANCELLED: the booking was cancelled after delivery failed ('
                 || COALESCE(f.last_error, '') || ')'
FROM booking.bookings b
WHERE f.id = ANY($1) AND b.id = f.booking_id
  AND b.state = 2 /* booking::CANCELLED */ AND f.state = 4 /* followups::FAILED */
"#,
        ids,
        now
    )
    .execute(&mut *tx)
    .await?;
    Ok(cancelled.rows_affected())
}

/// One page of FAILED follow-ups that failed in `window`, after the keyset
/// `after`, oldest failure first, locked (others skipped) for the re-drive
/// in the same transaction. Through `scheduled_followups_failed_idx` (a
/// FAILED row's `updated_at` is when it failed).
pub async fn failed_page(
    tx: &mut PgConnection,
    window: (DateTime<Utc>, DateTime<Utc>),
    after: (DateTime<Utc>, Uuid),
    limit: i64,
) -> Result<Vec<(Uuid, DateTime<Utc>)>, sqlx::Error> {
    let rows = sqlx::query!(
        r#"
SELECT f.id, f.updated_at
FROM booking.scheduled_followups f
WHERE f.state = 4 /* followups::FAILED */ AND f.updated_at >= $1 AND f.updated_at < $2
  AND (f.updated_at, f.id) > ($3, $4)
ORDER BY f.updated_at, f.id
LIMIT $5
FOR UPDATE SKIP LOCKED
"#,
        window.0,
        window.1,
        after.0,
        after.1,
        limit
    )
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| (row.id, row.updated_at))
        .collect())
}

/// A page of follow-ups, oldest first, plus one extra row.
pub async fn list(pool: &PgPool, page: &FollowUpPage) -> Result<Vec<FollowUpRow>, sqlx::Error> {
    let after = page.after.unwrap_or(Uuid::nil());
    let limit = i64::from(page.page_size) + 1;
    match (page.booking_id, page.conversation_id) {
        (Some(booking), _) => {
            sqlx::query_as!(
                FollowUpRow,
                r#"
SELECT id, booking_id, customer_id, conversation_id, trigger, template_key, rendered_text,
       state, scheduled_at, attempts, last_error, message_id, created_at, sent_at
FROM booking.scheduled_followups
WHERE booking_id = $1 AND id > $2
ORDER BY id
LIMIT $3
"#,
                booking,
                after,
                limit
            )
            .fetch_all(pool)
            .await
        }
        (None, Some(conversation)) => {
            sqlx::query_as!(
                FollowUpRow,
                r#"
SELECT id, booking_id, customer_id, conversation_id, trigger, template_key, rendered_text,
       state, scheduled_at, attempts, last_error, message_id, created_at, sent_at
FROM booking.scheduled_followups
WHERE conversation_id = $1 AND id > $2
ORDER BY id
LIMIT $3
"#,
                conversation,
                after,
                limit
            )
            .fetch_all(pool)
            .await
        }
        (None, None) => Ok(Vec::new()),
    }
}

/// Pending and failed follow-ups, each counted through its partial index.
pub async fn pending_and_failed(pool: &PgPool) -> Result<(i64, i64), sqlx::Error> {
    let counts = sqlx::query!(
        r#"
SELECT (SELECT count(*) FROM booking.scheduled_followups
        WHERE state = 1 /* followups::PENDING */) AS "pending!",
       (SELECT count(*) FROM booking.scheduled_followups
        WHERE state = 4 /* followups::FAILED */) AS "failed!"
"#
    )
    .fetch_one(pool)
    .await?;
    Ok((counts.pending, counts.failed))
}

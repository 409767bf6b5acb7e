//! Scheduled follow-ups: planning inserts them, delivery claims and
//! finishes them (claim, call, finish: no lock or connection is held across
//! the call to memory-service), RetryFollowUp re-drives the failed ones,
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

/// A follow-up claimed for one delivery attempt: what the call needs.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Claimed {
    pub id: Uuid,
    pub booking_id: Uuid,
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

/// Claims attempt `$4 + 1` of a follow-up for `$3` seconds under token `$2`:
/// only while it is PENDING, its booking CONFIRMED, no attempt was made
/// since the job was enqueued (`attempts = $4`), and no other run holds an
/// unexpired claim. One short statement: no lock outlives it, so nothing
/// waits on the delivery's network call (CancelBooking least of all).
const CLAIM: &str = "UPDATE booking.scheduled_followups f \
    SET claim_token = $2, claimed_until = now() + make_interval(secs => $3) \
    FROM booking.bookings b \
    WHERE f.id = $1 AND b.id = f.booking_id AND b.state = 1 AND b.erased_at IS NULL AND f.state = 1 AND f.attempts = $4 \
      AND (f.claimed_until IS NULL OR f.claimed_until < now()) \
    RETURNING f.id, f.booking_id, f.customer_id, f.conversation_id, f.template_key, \
              f.rendered_text, f.attempts, f.retry_from, f.last_error";

pub async fn claim(
    pool: &PgPool,
    id: Uuid,
    attempts_made: i32,
    token: Uuid,
    lease: std::time::Duration,
) -> Result<Option<Claimed>, sqlx::Error> {
    sqlx::query_as::<_, Claimed>(CLAIM)
        .bind(id)
        .bind(token)
        .bind(lease.as_secs_f64())
        .bind(attempts_made)
        .fetch_optional(pool)
        .await
}

/// Why a claim was refused.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Unclaimed {
    pub state: i16,
    pub attempts: i32,
    pub claimed_until: Option<DateTime<Utc>>,
    pub booking_state: i16,
}

const UNCLAIMED: &str = "SELECT f.state, f.attempts, f.claimed_until, b.state AS booking_state \
    FROM booking.scheduled_followups f JOIN booking.bookings b ON b.id = f.booking_id \
    WHERE f.id = $1";

pub async fn unclaimed(pool: &PgPool, id: Uuid) -> Result<Option<Unclaimed>, sqlx::Error> {
    sqlx::query_as::<_, Unclaimed>(UNCLAIMED)
        .bind(id)
        .fetch_optional(pool)
        .await
}

/// A PENDING follow-up whose booking is cancelled (a plan that raced the
/// cancel): CANCELLED, with the reason.
const CANCEL_FOR_CANCELLED_BOOKING: &str = "UPDATE booking.scheduled_followups f \
    SET state = 3, last_error = 'BOOKING_CANCELLED: the booking was cancelled', updated_at = $2 \
    FROM booking.bookings b \
    WHERE f.id = $1 AND b.id = f.booking_id AND b.state = 2 AND f.state = 1";

pub async fn cancel_for_cancelled_booking(
    pool: &PgPool,
    id: Uuid,
    now: DateTime<Utc>,
) -> Result<bool, sqlx::Error> {
    Ok(sqlx::query(CANCEL_FOR_CANCELLED_BOOKING)
        .bind(id)
        .bind(now)
        .execute(pool)
        .await?
        .rows_affected()
        == 1)
}

/// The `last_error` prefix of a follow-up stored after its booking was cancelled.
pub const SENT_AFTER_CANCEL: &str = "SENT_AFTER_CANCEL";

/// Finishes a stored delivery, if the claim `$2` still holds: PENDING →
/// SENT; a follow-up cancelled while the message was on its way stays
/// CANCELLED but records the stored message (`message_id`, `sent_at`, and a
/// `last_error` saying so), so that nothing stored is unaccounted for.
/// Returns the state it ended in; none when the claim was lost (the lease
/// ran out and another run claimed: that run finishes, with the same
/// message, memory-service answering its `request_id` with the first one).
const FINISH_SENT: &str = concat!(
    "UPDATE booking.scheduled_followups \
     SET state = CASE WHEN state = 1 THEN 2 ELSE state END, \
         last_error = CASE WHEN state = 1 THEN NULL ELSE '",
    "SENT_AFTER_CANCEL",
    ": the booking was cancelled while this follow-up was being delivered; \
the message was stored (message_id)' END, \
         message_id = $3, sent_at = $4, updated_at = $4, attempts = attempts + 1, \
         claim_token = NULL, claimed_until = NULL \
     WHERE id = $1 AND claim_token = $2 AND state IN (1, 3) \
     RETURNING state"
);

pub async fn finish_sent(
    pool: &PgPool,
    id: Uuid,
    token: Uuid,
    message_id: Uuid,
    now: DateTime<Utc>,
) -> Result<Option<i16>, sqlx::Error> {
    sqlx::query_scalar::<_, i16>(FINISH_SENT)
        .bind(id)
        .bind(token)
        .bind(message_id)
        .bind(now)
        .fetch_optional(pool)
        .await
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

/// Records a failed attempt if the claim `$2` still holds on a PENDING
/// follow-up: the count, the error, and the new state and time. Returns the
/// attempts made, none when the claim was lost or the follow-up was
/// cancelled meanwhile (nothing to record then).
const FINISH_FAILED_ATTEMPT: &str = "UPDATE booking.scheduled_followups \
    SET attempts = attempts + 1, last_error = $3, updated_at = $4, state = $5, \
        scheduled_at = COALESCE($6, scheduled_at), claim_token = NULL, claimed_until = NULL \
    WHERE id = $1 AND claim_token = $2 AND state = 1 \
    RETURNING attempts";

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
    sqlx::query_scalar::<_, i32>(FINISH_FAILED_ATTEMPT)
        .bind(id)
        .bind(token)
        .bind(error)
        .bind(now)
        .bind(state)
        .bind(next_at)
        .fetch_optional(&mut *tx)
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

const REDRIVE_VIEW: &str = concat!(
    "SELECT f.",
    "id, f.booking_id, f.customer_id, f.conversation_id, f.trigger, f.template_key, \
     f.rendered_text, f.state, f.scheduled_at, f.attempts, f.last_error, f.message_id, \
     f.created_at, f.sent_at, b.state AS booking_state, f.redriven_at \
     FROM booking.scheduled_followups f JOIN booking.bookings b ON b.id = f.booking_id \
     WHERE f.id = $1"
);

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
const REDRIVE: &str = "UPDATE booking.scheduled_followups f \
    SET state = 1, retry_from = f.attempts, redriven_at = $2, redrives = f.redrives + 1, \
        scheduled_at = $2, updated_at = $2, claim_token = NULL, claimed_until = NULL \
    FROM booking.bookings b \
    WHERE f.id = ANY($1) AND b.id = f.booking_id AND b.state = 1 AND b.erased_at IS NULL AND f.state = 4 \
    RETURNING f.id, f.attempts";

pub async fn redrive(
    tx: &mut PgConnection,
    ids: &[Uuid],
    now: DateTime<Utc>,
) -> Result<Vec<(Uuid, i32)>, sqlx::Error> {
    sqlx::query_as::<_, (Uuid, i32)>(REDRIVE)
        .bind(ids)
        .bind(now)
        .fetch_all(&mut *tx)
        .await
}

/// FAILED follow-ups of cancelled bookings → CANCELLED (they are never
/// re-driven: nobody is to be followed up). Returns how many.
const CANCEL_FAILED_OF_CANCELLED_BOOKINGS: &str = "UPDATE booking.scheduled_followups f \
    SET state = 3, updated_at = $2, \
        last_error = 'BOOKING_CANCELLED: the booking was cancelled after delivery failed (' \
                     || COALESCE(f.last_error, '') || ')' \
    FROM booking.bookings b \
    WHERE f.id = ANY($1) AND b.id = f.booking_id AND b.state = 2 AND f.state = 4";

pub async fn cancel_failed_of_cancelled_bookings(
    tx: &mut PgConnection,
    ids: &[Uuid],
    now: DateTime<Utc>,
) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(CANCEL_FAILED_OF_CANCELLED_BOOKINGS)
        .bind(ids)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected())
}

/// One page of FAILED follow-ups that failed in [`$1`, `$2`), after the
/// keyset (`$3`, `$4`), oldest failure first, locked (others skipped) for
/// the re-drive in the same transaction. Through `scheduled_followups_failed_idx`
/// (a FAILED row's `updated_at` is when it failed).
const FAILED_PAGE: &str = "SELECT f.id, f.updated_at FROM booking.scheduled_followups f \
    WHERE f.state = 4 AND f.updated_at >= $1 AND f.updated_at < $2 \
      AND (f.updated_at, f.id) > ($3, $4) \
    ORDER BY f.updated_at, f.id LIMIT $5 \
    FOR UPDATE SKIP LOCKED";

pub async fn failed_page(
    tx: &mut PgConnection,
    window: (DateTime<Utc>, DateTime<Utc>),
    after: (DateTime<Utc>, Uuid),
    limit: i64,
) -> Result<Vec<(Uuid, DateTime<Utc>)>, sqlx::Error> {
    sqlx::query_as::<_, (Uuid, DateTime<Utc>)>(FAILED_PAGE)
        .bind(window.0)
        .bind(window.1)
        .bind(after.0)
        .bind(after.1)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await
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

//! What every drill proves at the end, straight from the database: nothing
//! the client saw confirmed is lost, nothing is done twice, seats add up.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use maitre_runtime::testkit::wait_for;
use sqlx::PgPool;
use uuid::Uuid;

use crate::client::Ledger;

/// Follow-up states (the proto enum's numbers).
const SENT: i16 = 2;
/// memory-service's role of an assistant message.
const ASSISTANT: i16 = 2;
const USER: i16 = 1;

/// Counts a drill reports.
#[derive(Debug, Default)]
pub struct Totals {
    pub bookings: usize,
    pub follow_ups: i64,
    pub delivered: i64,
    pub assistant_messages: i64,
    /// Assistant messages beyond one per follow-up (must be 0).
    pub duplicates: i64,
    /// Follow-ups that needed more than one delivery attempt.
    pub retried_deliveries: i64,
    /// Follow-ups whose planning was retried.
    pub replanned: i64,
    /// Deliveries stored by an attempt whose answer was lost: a later
    /// attempt found the message already stored (request id) and marked it sent.
    pub answer_lost: i64,
}

/// Waits (at most `within`) until the follow-up of every booking in `ledger`
/// is SENT; on timeout, fails with what the pipeline looks like.
pub async fn wait_all_sent(db: &PgPool, ledger: &Ledger, within: Duration) -> Duration {
    let ids: Vec<Uuid> = ledger.confirmed.iter().map(|c| c.booking_id).collect();
    let expected = i64::try_from(ids.len()).expect("count");
    let started = std::time::Instant::now();
    let waited = tokio::time::timeout(
        within,
        wait_for(
            "every confirmed booking's follow-up to be SENT",
            within + Duration::from_secs(5),
            || async {
                let sent: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM booking.scheduled_followups \
                     WHERE state = $1 AND booking_id = ANY($2)",
                )
                .bind(SENT)
                .bind(&ids)
                .fetch_one(db)
                .await
                .ok()?;
                (sent >= expected).then_some(())
            },
        ),
    )
    .await;
    if waited.is_err() {
        panic!(
            "not every follow-up SENT within {within:?} ({expected} bookings confirmed):\n{}",
            diagnose(db, &ids).await
        );
    }
    started.elapsed()
}

/// The pipeline's state, for a failure message.
pub async fn diagnose(db: &PgPool, ids: &[Uuid]) -> String {
    let mut out = String::new();
    let unplanned: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM unnest($1::uuid[]) AS b(id) WHERE NOT EXISTS \
         (SELECT 1 FROM booking.scheduled_followups f WHERE f.booking_id = b.id)",
    )
    .bind(ids)
    .fetch_one(db)
    .await
    .unwrap_or(-1);
    out.push_str(&format!(
        "confirmed bookings without a follow-up row: {unplanned}\n"
    ));
    let states: Vec<(i16, i64)> = sqlx::query_as(
        "SELECT state, count(*) FROM booking.scheduled_followups GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(db)
    .await
    .unwrap_or_default();
    out.push_str(&format!(
        "follow-ups by state (1 pending, 2 sent, 3 cancelled, 4 failed): {states:?}\n"
    ));
    let jobs: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT job_type, status, count(*) FROM apalis.jobs GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .fetch_all(db)
    .await
    .unwrap_or_default();
    out.push_str(&format!("apalis jobs by queue and status: {jobs:?}\n"));
    let stuck: Vec<(String, String, String, Option<String>, i32)> = sqlx::query_as(
        "SELECT id, job_type, status, lock_by, attempts FROM apalis.jobs \
         WHERE status NOT IN ('Done') ORDER BY run_at LIMIT 10",
    )
    .fetch_all(db)
    .await
    .unwrap_or_default();
    out.push_str(&format!("unfinished jobs (first 10): {stuck:#?}\n"));
    let pending: Vec<(Uuid, i16, i32, Option<String>)> = sqlx::query_as(
        "SELECT id, state, attempts, last_error FROM booking.scheduled_followups \
         WHERE state <> 2 ORDER BY scheduled_at LIMIT 10",
    )
    .fetch_all(db)
    .await
    .unwrap_or_default();
    out.push_str(&format!("unsent follow-ups (first 10): {pending:#?}\n"));
    let workers: Vec<(String, String, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
        "SELECT id, worker_type, last_seen FROM apalis.workers ORDER BY last_seen DESC LIMIT 20",
    )
    .fetch_all(db)
    .await
    .unwrap_or_default();
    out.push_str(&format!("workers: {workers:#?}"));
    out
}

/// Asserts exactly-once end to end and consistent seats; returns the counts.
pub async fn assert_nothing_lost(db: &PgPool, ledger: &Ledger) -> Totals {
    assert!(
        ledger.gave_up.is_empty(),
        "calls still failing after every retry: {:#?}",
        ledger.gave_up
    );
    assert!(
        !ledger.confirmed.is_empty(),
        "the drill confirmed no booking at all"
    );
    let seen: HashSet<Uuid> = ledger.confirmed.iter().map(|c| c.booking_id).collect();
    assert_eq!(
        seen.len(),
        ledger.confirmed.len(),
        "two requests were answered with the same booking"
    );

    // Every booking the client saw confirmed exists, confirmed, and no
    // booking exists that the client was not told about.
    let stored: HashSet<Uuid> =
        sqlx::query_scalar::<_, Uuid>("SELECT id FROM booking.bookings WHERE state = 1")
            .fetch_all(db)
            .await
            .expect("bookings")
            .into_iter()
            .collect();
    let lost: Vec<_> = seen.difference(&stored).collect();
    assert!(
        lost.is_empty(),
        "confirmed to the client but not stored: {lost:?}"
    );
    let phantom: Vec<_> = stored.difference(&seen).collect();
    assert!(
        phantom.is_empty(),
        "stored but never confirmed to the client (a retry should have found them): {phantom:?}"
    );

    // Exactly one follow-up per booking, SENT.
    let rows: Vec<(Uuid, i64, i64)> = sqlx::query_as(
        "SELECT booking_id, count(*), count(*) FILTER (WHERE state = $1) \
         FROM booking.scheduled_followups GROUP BY booking_id",
    )
    .bind(SENT)
    .fetch_all(db)
    .await
    .expect("follow-ups per booking");
    let per_booking: HashMap<Uuid, (i64, i64)> = rows
        .into_iter()
        .map(|(b, all, sent)| (b, (all, sent)))
        .collect();
    let wrong: Vec<_> = seen
        .iter()
        .filter(|b| per_booking.get(b) != Some(&(1, 1)))
        .map(|b| (b, per_booking.get(b)))
        .collect();
    assert!(
        wrong.is_empty(),
        "bookings without exactly one SENT follow-up ((rows, sent) per booking): {wrong:?}"
    );
    let stray: Vec<_> = per_booking.keys().filter(|b| !seen.contains(b)).collect();
    assert!(
        stray.is_empty(),
        "follow-ups of unknown bookings: {stray:?}"
    );
    let follow_ups: i64 = per_booking.values().map(|(all, _)| all).sum();

    // Exactly one assistant message per follow-up, keyed by its request id.
    let duplicated: Vec<(Option<String>, i64)> = sqlx::query_as(
        "SELECT request_id, count(*) FROM memory.messages WHERE role = $1 \
         GROUP BY 1 HAVING count(*) > 1",
    )
    .bind(ASSISTANT)
    .fetch_all(db)
    .await
    .expect("duplicate deliveries");
    let assistant_messages: i64 =
        sqlx::query_scalar("SELECT count(*) FROM memory.messages WHERE role = $1")
            .bind(ASSISTANT)
            .fetch_one(db)
            .await
            .expect("assistant messages");
    let matched: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM booking.scheduled_followups f JOIN memory.messages m \
         ON m.request_id = f.id::text AND m.id = f.message_id AND m.role = $1 \
         AND m.conversation_id = f.conversation_id",
    )
    .bind(ASSISTANT)
    .fetch_one(db)
    .await
    .expect("delivered follow-ups");
    let duplicates = assistant_messages - follow_ups;
    assert!(
        duplicated.is_empty(),
        "follow-ups delivered more than once (request_id, messages): {duplicated:?}"
    );
    assert_eq!(
        assistant_messages, follow_ups,
        "assistant messages in memory-service vs follow-ups"
    );
    assert_eq!(
        matched, follow_ups,
        "follow-ups whose message_id is the assistant message stored under their id"
    );

    // The client's own messages: one per conversation, whatever the retries.
    let doubled: Vec<(Uuid, i64)> = sqlx::query_as(
        "SELECT conversation_id, count(*) FROM memory.messages WHERE role = $1 \
         GROUP BY 1 HAVING count(*) <> 1",
    )
    .bind(USER)
    .fetch_all(db)
    .await
    .expect("user messages");
    assert!(
        doubled.is_empty(),
        "conversations with other than one user message: {doubled:?}"
    );

    // Seats: each slot's count equals its confirmed bookings' party sizes,
    // in the database and as the client saw them.
    let slots: Vec<(Uuid, i32, i64)> = sqlx::query_as(
        "SELECT s.id, s.booked, COALESCE(sum(b.party_size) FILTER (WHERE b.state = 1), 0) \
         FROM booking.slots s LEFT JOIN booking.bookings b ON b.slot_id = s.id \
         GROUP BY s.id, s.booked",
    )
    .fetch_all(db)
    .await
    .expect("seats");
    let mut by_client: HashMap<Uuid, i64> = HashMap::new();
    for c in &ledger.confirmed {
        *by_client.entry(c.slot_id).or_default() += i64::from(c.party_size);
    }
    for (slot, booked, summed) in &slots {
        assert_eq!(
            i64::from(*booked),
            *summed,
            "slot {slot}: booked seats vs its bookings' party sizes"
        );
        assert_eq!(
            i64::from(*booked),
            by_client.get(slot).copied().unwrap_or(0),
            "slot {slot}: booked seats vs what the client was confirmed"
        );
    }

    let (retried_deliveries, replanned, answer_lost): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE f.attempts > 1), count(*) FILTER (WHERE f.plan_attempts > 1), \
                count(*) FILTER (WHERE f.attempts > 1 AND m.created_at < f.sent_at) \
         FROM booking.scheduled_followups f LEFT JOIN memory.messages m ON m.id = f.message_id",
    )
    .fetch_one(db)
    .await
    .expect("attempts");
    Totals {
        bookings: ledger.confirmed.len(),
        follow_ups,
        delivered: matched,
        assistant_messages,
        duplicates,
        retried_deliveries,
        replanned,
        answer_lost,
    }
}

/// apalis jobs by queue and status, with how many ran more than once (a
/// killed worker's jobs re-enqueued, or a handler error), e.g.
/// `plan Done=349 (9 again)`.
pub async fn job_statuses(db: &PgPool) -> String {
    let jobs: Vec<(String, String, i64, i64)> = sqlx::query_as(
        "SELECT job_type, status, count(*), count(*) FILTER (WHERE attempts > 1) \
         FROM apalis.jobs GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .fetch_all(db)
    .await
    .expect("job statuses");
    jobs.into_iter()
        .map(|(queue, status, n, again)| {
            let queue = queue.rsplit('.').next().unwrap_or(&queue).to_owned();
            format!("{queue} {status}={n} ({again} again)")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The drill's summary line, to be quoted.
pub fn report(drill: &str, totals: &Totals, extra: &str) {
    println!(
        "DRILL {drill}: bookings={} follow-ups={} delivered={} assistant-messages={} duplicates={} \
         retried-deliveries={} answer-lost-then-replayed={} replanned={} {extra}",
        totals.bookings,
        totals.follow_ups,
        totals.delivered,
        totals.assistant_messages,
        totals.duplicates,
        totals.retried_deliveries,
        totals.answer_lost,
        totals.replanned,
    );
}

/// Refusals are acceptable only when a retry outlived its slot's start
/// (the first attempt never committed, so the slot was still free).
pub fn assert_only_late_refusals(ledger: &Ledger) {
    let unexpected: Vec<_> = ledger
        .refused
        .iter()
        .filter(|r| !r.contains("SLOT_STARTED"))
        .collect();
    assert!(unexpected.is_empty(), "bookings refused: {unexpected:#?}");
}

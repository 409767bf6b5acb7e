//! Enqueueing follow-up jobs into apalis's tables, always inside the
//! caller's transaction, and the queue housekeeping apalis leaves to us
//! (depth by state, pruning every kind of dead row, dead-lettering rows
//! apalis cannot read).
//!
//! Idempotency keys are `<follow-up or booking id>/<attempt>`, and attempt
//! numbers only grow (the follow-up's `attempts`, the booking's
//! `plan_attempt`, both advanced by compare-and-set), so a key names one
//! attempt forever. A clash on a key therefore means either a racing run of
//! the same attempt (its job is live: it carries the chain on) or a leftover
//! dead row (deleted, then the push is made again): never a silent drop.

use std::time::{Duration, SystemTime};

use apalis_core::task::builder::TaskBuilder;
use apalis_postgres::PgTask;
use chrono::{DateTime, Utc};
use maitre_runtime::otel::TracedStatement;
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::domain::followup_jobs::{DELIVER_QUEUE, DeliverFollowUp, PLAN_QUEUE, PlanFollowUp};

/// apalis's own retries (immediate, no backoff) are only a safety net for
/// unexpected errors; planned retries are re-scheduled jobs (see `jobs`).
pub const APALIS_MAX_ATTEMPTS: usize = 3;

fn task<T: Serialize>(
    payload: &T,
    key: String,
    run_at: Option<SystemTime>,
) -> Result<PgTask, sqlx::Error> {
    let bytes = serde_json::to_vec(payload).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    let mut builder = TaskBuilder::new(bytes)
        .max_attempts(APALIS_MAX_ATTEMPTS)
        .idempotency_key(key);
    if let Some(at) = run_at {
        builder = builder.run_at_time(at);
    }
    Ok(builder.build())
}

/// A plan job's row as `push_tasks` would write it, for statements that
/// insert it themselves (CreateBooking).
#[derive(Debug, Clone, PartialEq)]
pub struct JobRow {
    /// A ULID, like every apalis task id (the worker refuses other ids).
    pub id: String,
    /// The JSON the worker's codec decodes.
    pub payload: Vec<u8>,
    pub max_attempts: i32,
    pub idempotency_key: String,
}

pub fn plan_job_row(job: &PlanFollowUp) -> Result<JobRow, sqlx::Error> {
    Ok(JobRow {
        id: ulid::Ulid::generate().to_string(),
        payload: serde_json::to_vec(job).map_err(|e| sqlx::Error::Encode(Box::new(e)))?,
        max_attempts: APALIS_MAX_ATTEMPTS as i32,
        idempotency_key: plan_key(job.booking_id, job.attempt),
    })
}

/// A deliver job's row as `push_tasks` would write it (the first delivery
/// of a reminder, written with its booking).
pub fn deliver_job_row(job: &DeliverFollowUp) -> Result<JobRow, sqlx::Error> {
    Ok(JobRow {
        id: ulid::Ulid::generate().to_string(),
        payload: serde_json::to_vec(job).map_err(|e| sqlx::Error::Encode(Box::new(e)))?,
        max_attempts: APALIS_MAX_ATTEMPTS as i32,
        idempotency_key: deliver_key(job.follow_up_id, job.attempt),
    })
}

/// What a push did. Both are success for the caller: the attempt has a
/// live job either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// A new job row.
    New,
    /// A live job already holds this key (a racing run of the same attempt
    /// enqueued it first); it does the work.
    AlreadyLive,
}

/// Pushes a job under its idempotency key. On a clash, a dead row holding
/// the key is deleted and the push made again; a live one is left to do the
/// work. The savepoint keeps the caller's transaction usable after the clash.
async fn push(
    tx: &mut PgConnection,
    queue: &str,
    key: &str,
    make: impl Fn() -> Result<PgTask, sqlx::Error>,
) -> Result<Enqueued, sqlx::Error> {
    for _ in 0..2 {
        let mut savepoint = sqlx::Acquire::begin(&mut *tx).await?;
        let pushed = apalis_postgres::queries::push_tasks(&mut *savepoint, queue, vec![make()?])
            .traced("jobs::push")
            .await;
        match pushed {
            Ok(()) => {
                savepoint.commit().await?;
                return Ok(Enqueued::New);
            }
            Err(apalis_postgres::Error::Database(sqlx::Error::Database(e)))
                if e.constraint() == Some("idx_jobs_idempotency_key") =>
            {
                savepoint.rollback().await?;
                if super::sweeps::delete_dead_job(tx, queue, key).await? == 0 {
                    return Ok(Enqueued::AlreadyLive);
                }
                tracing::debug!(key, "a dead job held the key; removed, pushing again");
            }
            Err(apalis_postgres::Error::Database(e)) => return Err(e),
            Err(other) => return Err(sqlx::Error::Protocol(other.to_string())),
        }
    }
    // The dead row was deleted and a live one took the key in between.
    Ok(Enqueued::AlreadyLive)
}

/// The idempotency key of plan attempt `attempt` of a booking.
pub fn plan_key(booking_id: Uuid, attempt: u32) -> String {
    format!("{booking_id}/{attempt}")
}

/// The idempotency key of delivery attempt `attempt` of a follow-up.
pub fn deliver_key(follow_up_id: Uuid, attempt: u32) -> String {
    format!("{follow_up_id}/{attempt}")
}

/// Enqueues attempt `job.attempt` of planning a booking's follow-up, due
/// after `delay` (none: now). The caller holds that attempt (it advanced the
/// booking's `plan_attempt` to it in the same transaction).
pub async fn push_plan(
    tx: &mut PgConnection,
    job: &PlanFollowUp,
    delay: Option<Duration>,
) -> Result<Enqueued, sqlx::Error> {
    let key = plan_key(job.booking_id, job.attempt);
    let at = delay.map(|d| SystemTime::now() + d);
    push(tx, PLAN_QUEUE, &key, || task(job, key.clone(), at)).await
}

/// Enqueues the first delivery of a follow-up inserted by the same
/// transaction: its key cannot exist yet, so no savepoint (two round trips
/// fewer on every follow-up).
pub async fn push_first_deliver(
    tx: &mut PgConnection,
    job: &DeliverFollowUp,
    at: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    let key = deliver_key(job.follow_up_id, job.attempt);
    let task = task(job, key, Some(SystemTime::from(at)))?;
    apalis_postgres::queries::push_tasks(&mut *tx, DELIVER_QUEUE, vec![task])
        .traced("jobs::push_first_deliver")
        .await
        .map_err(|error| match error {
            apalis_postgres::Error::Database(e) => e,
            other => sqlx::Error::Protocol(other.to_string()),
        })
}

/// Enqueues delivery attempt `job.attempt` of a follow-up, due at `at`.
pub async fn push_deliver(
    tx: &mut PgConnection,
    job: &DeliverFollowUp,
    at: DateTime<Utc>,
) -> Result<Enqueued, sqlx::Error> {
    let key = deliver_key(job.follow_up_id, job.attempt);
    push(tx, DELIVER_QUEUE, &key, || {
        task(job, key.clone(), Some(SystemTime::from(at)))
    })
    .await
}

/// Enqueues many first attempts after a re-drive, due now, in two
/// statements: leftover dead rows holding the keys go first. A live row
/// holding one of the keys fails the whole batch (it cannot exist: the
/// re-driven follow-ups were FAILED, so no attempt of theirs was live).
pub async fn push_delivers_now(
    tx: &mut PgConnection,
    jobs: &[DeliverFollowUp],
) -> Result<(), sqlx::Error> {
    if jobs.is_empty() {
        return Ok(());
    }
    let keys: Vec<String> = jobs
        .iter()
        .map(|j| deliver_key(j.follow_up_id, j.attempt))
        .collect();
    // The dead rows holding any of the keys, in one statement, so the batch
    // can be pushed at once (the live-job test as in `sweeps::LIVE_JOB`).
    sqlx::query!(
        r#"
DELETE FROM apalis.jobs j
WHERE j.job_type = $1 AND j.idempotency_key = ANY($2)
  AND NOT (j.status IN ('Pending', 'Queued', 'Running')
           OR (j.status = 'Failed' AND j.attempts < j.max_attempts))
"#,
        DELIVER_QUEUE,
        &keys
    )
    .execute(&mut *tx)
    .await?;
    let tasks = jobs
        .iter()
        .zip(keys)
        .map(|(job, key)| task(job, key, None))
        .collect::<Result<Vec<_>, _>>()?;
    apalis_postgres::queries::push_tasks(&mut *tx, DELIVER_QUEUE, tasks)
        .await
        .map_err(|error| match error {
            apalis_postgres::Error::Database(e) => e,
            other => sqlx::Error::Protocol(other.to_string()),
        })
}

/// Jobs per queue and state, from our index on (job_type, status), for the
/// gauges. Only the states that hold work or need an operator (Pending, and
/// Scheduled = Pending due later; Queued/Running; Failed; Killed, the dead
/// letter): never Done, whose rows are the retained history. Counting them
/// read the whole history on every refresh (half a second at a million
/// rows, issue 12); this reads the index ranges of the other states only,
/// so its cost follows the work at hand. The literals are apalis's states.
/// The distinct due times (queue, run_at) of the jobs of `queues` still to
/// run and due within the next `within`, soonest first, at most `limit`:
/// the local wake-up timers a worker process sets (`jobs::wakeups`).
/// Through `maitre_jobs_due_idx`, a range of the job types' due times: it
/// reads the jobs of the window, not the bookings further ahead.
pub async fn due_within(
    pool: &PgPool,
    queues: &[&str],
    within: std::time::Duration,
    limit: i64,
) -> Result<Vec<(String, DateTime<Utc>)>, sqlx::Error> {
    let queues: Vec<String> = queues.iter().map(|q| (*q).to_owned()).collect();
    let rows = sqlx::query!(
        r#"
SELECT job_type AS "queue!", run_at AS "run_at!"
FROM apalis.jobs
WHERE job_type = ANY($1)
  AND (status = 'Pending' OR (status = 'Failed' AND attempts < max_attempts))
  AND run_at > now() AND run_at < now() + make_interval(secs => $2)
GROUP BY job_type, run_at
ORDER BY run_at
LIMIT $3
"#,
        &queues,
        within.as_secs_f64(),
        limit
    )
    .fetch_all(pool)
    .traced("jobs::due_within")
    .await?;
    Ok(rows.into_iter().map(|r| (r.queue, r.run_at)).collect())
}

pub const DEPTH: &str = r#"
SELECT job_type,
       CASE WHEN status = 'Pending' AND run_at > now() THEN 'Scheduled' ELSE status END AS state,
       count(*) AS count
FROM apalis.jobs
WHERE job_type = ANY($1) AND status IN ('Pending', 'Queued', 'Running', 'Failed', 'Killed')
GROUP BY 1, 2
"#;

pub async fn depth(pool: &PgPool) -> Result<Vec<(String, String, i64)>, sqlx::Error> {
    sqlx::query_as(DEPTH)
        .bind([PLAN_QUEUE, DELIVER_QUEUE])
        .fetch_all(pool)
        .await
}

/// Puts the jobs a stopped worker fetched but never started (`Queued`
/// under its name) back in the queue. apalis returns its fetched buffer on
/// a graceful stop, but a fetch still in flight when the stop comes is
/// dropped after its statement locked the rows; without this they would
/// wait for the worker's heartbeat to time out. Started jobs were drained.
pub const RELEASE_UNSTARTED: &str = r#"
UPDATE apalis.jobs
SET status = 'Pending', lock_by = NULL, lock_at = NULL
WHERE job_type = $1 AND lock_by = $2 AND status = 'Queued'
"#;

/// See [`RELEASE_UNSTARTED`]; returns how many.
pub async fn release_unstarted(
    pool: &PgPool,
    queue: &str,
    worker: &str,
) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(RELEASE_UNSTARTED)
        .bind(queue)
        .bind(worker)
        .execute(pool)
        .await?
        .rows_affected())
}

/// Rows deleted per statement while pruning, so that a large backlog never
/// holds long locks.
const PRUNE_BATCH_SIZE: u64 = 1000;

/// Deletes dead job rows older than the retention, a batch at a time: Done,
/// Killed (dead-lettered by us or apalis), and Failed with no attempt left
/// (apalis gave up; a Failed row with attempts left is still live). Through
/// `maitre_jobs_finished_idx`. Deleting a dead row also frees its
/// idempotency key, which nothing reuses (see the module docs). Raw, like
/// `PRUNE_WORKERS`: `prune` runs both through one loop. The status literals
/// are apalis's and match `maitre_jobs_finished_idx`'s predicate.
const PRUNE_JOBS: &str = r#"
DELETE FROM apalis.jobs WHERE id IN (
    SELECT id FROM apalis.jobs
    WHERE status IN ('Done', 'Killed', 'Failed') AND done_at < now() - make_interval(secs => $1)
      AND (status <> 'Failed' OR attempts >= max_attempts)
      AND job_type = ANY($2)
    LIMIT $3)
"#;

/// Deletes worker registrations (one per worker start) unseen for longer
/// than the retention and no longer named by any job row (`lock_by` is a
/// foreign key to them; apalis's index on it answers the NOT EXISTS).
const PRUNE_WORKERS: &str = r#"
DELETE FROM apalis.workers WHERE id IN (
    SELECT w.id FROM apalis.workers w
    WHERE w.last_seen < now() - make_interval(secs => $1) AND w.worker_type = ANY($2)
      AND NOT EXISTS (SELECT 1 FROM apalis.jobs j WHERE j.lock_by = w.id)
    LIMIT $3)
"#;

/// What one pruning pass deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub jobs: u64,
    pub workers: u64,
}

pub async fn prune(pool: &PgPool, retention: Duration) -> Result<Pruned, sqlx::Error> {
    let mut pruned = Pruned::default();
    for (sql, count) in [
        (PRUNE_JOBS, &mut pruned.jobs),
        // After the jobs: their rows are what keeps old workers referenced.
        (PRUNE_WORKERS, &mut pruned.workers),
    ] {
        loop {
            let batch = sqlx::query(sql)
                .bind(retention.as_secs_f64())
                .bind(vec![PLAN_QUEUE, DELIVER_QUEUE])
                .bind(PRUNE_BATCH_SIZE as i64)
                .execute(pool)
                .await?
                .rows_affected();
            *count += batch;
            if batch < PRUNE_BATCH_SIZE {
                break;
            }
        }
    }
    Ok(pruned)
}

//! Enqueueing follow-up jobs into apalis's tables, always inside the
//! caller's transaction, and the queue housekeeping apalis leaves to us
//! (depth by state, pruning finished rows).

use std::time::{Duration, SystemTime};

use apalis_core::task::builder::TaskBuilder;
use apalis_postgres::PgTask;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};

use crate::jobs::{DELIVER_QUEUE, DeliverFollowUp, PLAN_QUEUE, PlanFollowUp};

/// apalis's own retries (immediate, no backoff) are only a safety net for
/// unexpected errors; planned retries are re-scheduled jobs (see `jobs`).
const APALIS_MAX_ATTEMPTS: usize = 3;

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
        idempotency_key: format!("{}/{}", job.booking_id, job.attempt),
    })
}

/// Pushes a job; a job with the same idempotency key already exists when two
/// runs of one job race to schedule the same next attempt. That is success:
/// the savepoint keeps the caller's transaction usable.
async fn push(tx: &mut PgConnection, queue: &str, task: PgTask) -> Result<bool, sqlx::Error> {
    let mut savepoint = sqlx::Acquire::begin(&mut *tx).await?;
    match apalis_postgres::queries::push_tasks(&mut *savepoint, queue, vec![task]).await {
        Ok(()) => {
            savepoint.commit().await?;
            Ok(true)
        }
        Err(apalis_postgres::Error::Database(sqlx::Error::Database(e)))
            if e.constraint() == Some("idx_jobs_idempotency_key") =>
        {
            savepoint.rollback().await?;
            Ok(false)
        }
        Err(apalis_postgres::Error::Database(e)) => Err(e),
        Err(other) => Err(sqlx::Error::Protocol(other.to_string())),
    }
}

/// Enqueues attempt `job.attempt` of planning a booking's follow-up, due
/// after `delay` (none: now).
pub async fn push_plan(
    tx: &mut PgConnection,
    job: &PlanFollowUp,
    delay: Option<Duration>,
) -> Result<bool, sqlx::Error> {
    let key = format!("{}/{}", job.booking_id, job.attempt);
    let at = delay.map(|d| SystemTime::now() + d);
    push(tx, PLAN_QUEUE, task(job, key, at)?).await
}

/// Enqueues delivery attempt `job.attempt` of a follow-up, due at `at`.
/// Enqueues the first delivery of a follow-up inserted by the same
/// transaction: its key cannot exist yet, so no savepoint (two round trips
/// fewer on every follow-up).
pub async fn push_first_deliver(
    tx: &mut PgConnection,
    job: &DeliverFollowUp,
    at: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    let key = format!("{}/{}", job.follow_up_id, job.attempt);
    let task = task(job, key, Some(SystemTime::from(at)))?;
    apalis_postgres::queries::push_tasks(&mut *tx, DELIVER_QUEUE, vec![task])
        .await
        .map_err(|error| match error {
            apalis_postgres::Error::Database(e) => e,
            other => sqlx::Error::Protocol(other.to_string()),
        })
}

pub async fn push_deliver(
    tx: &mut PgConnection,
    job: &DeliverFollowUp,
    at: DateTime<Utc>,
) -> Result<bool, sqlx::Error> {
    let key = format!("{}/{}", job.follow_up_id, job.attempt);
    push(
        tx,
        DELIVER_QUEUE,
        task(job, key, Some(SystemTime::from(at)))?,
    )
    .await
}

/// Jobs per queue and state, from our index on (job_type, status): cheap,
/// unlike apalis's own statistics query. States: Pending (due), Scheduled
/// (Pending, due later), Queued/Running, Done, Failed, Killed.
const DEPTH: &str = "SELECT job_type, \
    CASE WHEN status = 'Pending' AND run_at > now() THEN 'Scheduled' ELSE status END AS state, \
    count(*) FROM apalis.jobs WHERE job_type = ANY($1) GROUP BY 1, 2";

pub async fn depth(pool: &PgPool) -> Result<Vec<(String, String, i64)>, sqlx::Error> {
    sqlx::query_as::<_, (String, String, i64)>(DEPTH)
        .bind(vec![PLAN_QUEUE, DELIVER_QUEUE])
        .fetch_all(pool)
        .await
}

/// Deletes finished job rows older than the retention, a batch at a time so
/// that a large backlog never holds long locks.
const PRUNE_BATCH: &str = "DELETE FROM apalis.jobs WHERE id IN ( \
    SELECT id FROM apalis.jobs \
    WHERE status IN ('Done', 'Killed') AND done_at < now() - make_interval(secs => $1) \
      AND job_type = ANY($2) \
    LIMIT 1000)";

pub async fn prune_finished(pool: &PgPool, retention: Duration) -> Result<u64, sqlx::Error> {
    let mut removed = 0;
    loop {
        let batch = sqlx::query(PRUNE_BATCH)
            .bind(retention.as_secs_f64())
            .bind(vec![PLAN_QUEUE, DELIVER_QUEUE])
            .execute(pool)
            .await?
            .rows_affected();
        removed += batch;
        if batch < 1000 {
            return Ok(removed);
        }
    }
}

/// Enqueues `job` again after its earlier job for the same attempt died
/// (see `store::sweeps`): the dead row goes, so its key can be reused.
pub async fn requeue_plan(tx: &mut PgConnection, job: &PlanFollowUp) -> Result<bool, sqlx::Error> {
    let key = format!("{}/{}", job.booking_id, job.attempt);
    super::sweeps::delete_dead_job(tx, PLAN_QUEUE, &key).await?;
    push(tx, PLAN_QUEUE, task(job, key, None)?).await
}

/// Like [`requeue_plan`], for a delivery attempt, due now.
pub async fn requeue_deliver(
    tx: &mut PgConnection,
    job: &DeliverFollowUp,
) -> Result<bool, sqlx::Error> {
    let key = format!("{}/{}", job.follow_up_id, job.attempt);
    super::sweeps::delete_dead_job(tx, DELIVER_QUEUE, &key).await?;
    push(tx, DELIVER_QUEUE, task(job, key, None)?).await
}

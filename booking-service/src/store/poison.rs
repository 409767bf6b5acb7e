//! The poison guard's SQL (`jobs::poison` decides which rows are
//! unreadable): reading apalis's job rows as stored, dead-lettering one,
//! releasing a stopped worker's others. All in the caller's transaction.

use sqlx::{PgConnection, postgres::types::PgHstore};

/// The rows the (patched) fetch would take next, in its order, locked
/// (rows another worker is fetching right now are skipped). Through
/// `maitre_jobs_due_idx` (our migration). These four stay raw strings run with
/// `sqlx::query`: the rows carry apalis's `hstore` metadata, a type sqlx's
/// macros do not map. The status literals are apalis's own.
const HEAD_OF_QUEUE: &str = r#"
SELECT id, job, metadata FROM apalis.jobs
WHERE job_type = $1 AND (status = 'Pending' OR (status = 'Failed' AND attempts < max_attempts))
  AND run_at < now()
ORDER BY run_at ASC
LIMIT $2
FOR UPDATE SKIP LOCKED
"#;

/// The rows a stopped worker held (fetched, maybe started). Through
/// apalis's `idx_apalis_jobs_lock_by`.
const HELD_BY: &str = r#"
SELECT id, job, metadata FROM apalis.jobs
WHERE job_type = $1 AND lock_by = $2 AND status IN ('Queued', 'Running')
FOR UPDATE SKIP LOCKED
"#;

/// Dead-letters one row, in apalis's own terms: Killed, done, its error as
/// the result (`{"Err": ...}`, as apalis records failures).
const KILL: &str = r#"
UPDATE apalis.jobs
SET status = 'Killed', done_at = now(), lock_by = NULL, lock_at = NULL,
    last_result = jsonb_build_object('Err', $3::text)
WHERE id = $1 AND job_type = $2
"#;

/// Puts a stopped worker's readable rows back in the queue (as apalis's own
/// orphan recovery does, a started one with its attempt counted).
const RELEASE: &str = r#"
UPDATE apalis.jobs
SET attempts = attempts + CASE WHEN status = 'Running' THEN 1 ELSE 0 END,
    status = 'Pending', lock_by = NULL, lock_at = NULL, done_at = NULL,
    last_result = '{"Err": "Re-enqueued: its worker stopped on an error"}'::jsonb
WHERE job_type = $1 AND lock_by = $2 AND status IN ('Queued', 'Running') AND id <> ALL($3)
"#;

/// A job row as apalis stores it, before apalis reads it.
#[derive(sqlx::FromRow)]
pub struct RawJob {
    pub id: String,
    pub job: Vec<u8>,
    pub metadata: Option<PgHstore>,
}

/// The rows the next fetch of `queue` would take, up to `limit`, locked.
pub async fn head_of_queue(
    tx: &mut PgConnection,
    queue: &str,
    limit: i64,
) -> Result<Vec<RawJob>, sqlx::Error> {
    sqlx::query_as::<_, RawJob>(HEAD_OF_QUEUE)
        .bind(queue)
        .bind(limit)
        .fetch_all(tx)
        .await
}

/// The rows `worker` held in `queue`, locked.
pub async fn held_by(
    tx: &mut PgConnection,
    queue: &str,
    worker: &str,
) -> Result<Vec<RawJob>, sqlx::Error> {
    sqlx::query_as::<_, RawJob>(HELD_BY)
        .bind(queue)
        .bind(worker)
        .fetch_all(tx)
        .await
}

/// Marks row `id` of `queue` Killed with `error` as its result.
pub async fn kill(
    tx: &mut PgConnection,
    id: &str,
    queue: &str,
    error: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(KILL)
        .bind(id)
        .bind(queue)
        .bind(error)
        .execute(tx)
        .await?;
    Ok(())
}

/// Puts the rows `worker` held in `queue`, but those in `killed`, back to
/// Pending. Returns how many.
pub async fn release(
    tx: &mut PgConnection,
    queue: &str,
    worker: &str,
    killed: &[&str],
) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(RELEASE)
        .bind(queue)
        .bind(worker)
        .bind(killed)
        .execute(tx)
        .await?
        .rows_affected())
}

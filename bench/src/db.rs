//! The bench database: created fresh for every run, plus the few reads the
//! bench makes of it (queue state, follow-up progress, the machine's
//! PostgreSQL settings).

use std::{str::FromStr, time::Duration};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use sqlx::{
    AssertSqlSafe, PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use crate::floor::scripts;

/// Drops and recreates database `name` on the server of `admin_url`.
pub async fn recreate(admin_url: &str, name: &str) -> Result<()> {
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        bail!("database name {name:?}: use lower-case letters, digits and _");
    }
    let admin = PgPool::connect(admin_url).await.with_context(|| {
        format!("connecting to {admin_url} (is PostgreSQL running? see --database-url)")
    })?;
    sqlx::query(AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&admin)
    .await
    .with_context(|| format!("dropping database {name}"))?;
    sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&admin)
        .await
        .with_context(|| format!("creating database {name}"))?;
    admin.close().await;
    Ok(())
}

/// A small pool on the bench database for the bench's own queries, which
/// pg_stat_statements leaves out (they are not the services' cost).
pub async fn connect(url: &str) -> Result<PgPool> {
    let options = PgConnectOptions::from_str(url)
        .with_context(|| format!("parsing {url}"))?
        .options([("pg_stat_statements.track", "none")]);
    PgPoolOptions::new()
        .max_connections(2)
        .connect_with(options)
        .await
        .with_context(|| format!("connecting to {url}"))
}

/// Schema `bench` (id helpers, the single-write table).
pub async fn setup(pool: &PgPool) -> Result<()> {
    sqlx::raw_sql(scripts::SETUP)
        .execute(pool)
        .await
        .context("creating schema bench")?;
    Ok(())
}

/// Flushes dirty pages, so that no run pays for an earlier run's checkpoint.
pub async fn checkpoint(pool: &PgPool) -> Result<()> {
    sqlx::query("CHECKPOINT")
        .execute(pool)
        .await
        .context("CHECKPOINT (the bench needs a superuser or pg_checkpoint role)")?;
    Ok(())
}

/// Slots for a floor run (see [`scripts::FLOOR_SLOTS`]).
pub async fn floor_slots(pool: &PgPool, run: u64, clients: usize) -> Result<()> {
    sqlx::query(scripts::FLOOR_SLOTS)
        .bind(i64::try_from(run)?)
        .bind(i64::try_from(clients)?)
        .bind(scripts::SLOTS_PER_CLIENT)
        .bind(i32::try_from(scripts::SLOT_CAPACITY)?)
        .execute(pool)
        .await
        .context("creating the floor's slots")?;
    Ok(())
}

/// Deletes the floor's never-worked jobs, so that they do not pile up in
/// the table the workers fetch from, and marks their bookings planned: a
/// booking left unplanned without a live plan job is what booking-service's
/// sweep plans again (after 5 minutes), which would put the floor's
/// bookings into a later scenario's work.
pub async fn clear_floor_jobs(pool: &PgPool) -> Result<()> {
    sqlx::query(
        r#"
WITH gone AS (
    DELETE FROM apalis.jobs WHERE job_type = $1 RETURNING job
)
UPDATE booking.bookings b SET followup_planned_at = now()
FROM gone
WHERE b.id = (convert_from(gone.job, 'UTF8')::jsonb ->> 'booking_id')::uuid
  AND b.followup_planned_at IS NULL
"#,
    )
    .bind(scripts::FLOOR_QUEUE)
    .execute(pool)
    .await
    .context("deleting the floor's jobs")?;
    Ok(())
}

/// Waits (at most `limit`) until the server has room for `clients` more
/// connections: other work on a shared server may hold many. Returns the
/// room found.
pub async fn wait_for_connections(pool: &PgPool, clients: usize, limit: Duration) -> Result<i64> {
    let started = tokio::time::Instant::now();
    loop {
        let room: i64 = sqlx::query_scalar(
            "SELECT current_setting('max_connections')::int8 \
                  - current_setting('superuser_reserved_connections')::int8 \
                  - (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')",
        )
        .fetch_one(pool)
        .await
        .context("counting free connections")?;
        if room > i64::try_from(clients)? || started.elapsed() >= limit {
            return Ok(room);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Deletes plan jobs nobody worked on (a run with the workers off).
pub async fn discard_plan_jobs(pool: &PgPool) -> Result<()> {
    sqlx::query("DELETE FROM apalis.jobs WHERE job_type = $1 AND status = 'Pending'")
        .bind(booking_service::jobs::PLAN_QUEUE)
        .execute(pool)
        .await
        .context("deleting unplanned jobs")?;
    Ok(())
}

/// Jobs due but not finished in booking-service's queues.
pub async fn queue_backlog(pool: &PgPool) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM apalis.jobs WHERE job_type = ANY($1) \
         AND status IN ('Pending', 'Queued', 'Running') AND run_at <= now()",
    )
    .bind(vec![
        booking_service::jobs::PLAN_QUEUE,
        booking_service::jobs::DELIVER_QUEUE,
    ])
    .fetch_one(pool)
    .await?)
}

/// Waits until the follow-up workers have caught up; returns how long it
/// took and what was left if they did not within `limit`.
pub async fn drain(pool: &PgPool, limit: Duration) -> Result<(Duration, i64)> {
    let started = tokio::time::Instant::now();
    loop {
        let backlog = queue_backlog(pool).await?;
        if backlog == 0 || started.elapsed() >= limit {
            return Ok((started.elapsed(), backlog));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The PostgreSQL server as the report describes it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ServerInfo {
    pub version: String,
    pub fsync: String,
    pub synchronous_commit: String,
    pub shared_buffers: String,
    pub max_connections: String,
}

pub async fn server_info(pool: &PgPool) -> Result<ServerInfo> {
    let show = |name: &'static str| async move {
        sqlx::query_scalar::<_, String>(AssertSqlSafe(format!("SHOW {name}")))
            .fetch_one(pool)
            .await
            .with_context(|| format!("SHOW {name}"))
    };
    Ok(ServerInfo {
        version: sqlx::query_scalar("SELECT version()")
            .fetch_one(pool)
            .await?,
        fsync: show("fsync").await?,
        synchronous_commit: show("synchronous_commit").await?,
        shared_buffers: show("shared_buffers").await?,
        max_connections: show("max_connections").await?,
    })
}

/// The postmaster's pid, when the server runs on this machine: the parent
/// of our backend, if /proc shows it as a postgres process.
pub async fn postmaster_pid(pool: &PgPool) -> Option<u32> {
    let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(pool)
        .await
        .ok()?;
    let backend = u32::try_from(backend).ok()?;
    let comm = std::fs::read_to_string(format!("/proc/{backend}/comm")).ok()?;
    if !comm.starts_with("postgres") {
        return None;
    }
    crate::resources::parent_pid(backend)
        .ok()
        .filter(|&p| p > 1)
}

/// Inserts `n` finished jobs split over the running workers of
/// booking-service's queues, as a long-lived worker leaves them behind
/// (done an hour ago, so housekeeping keeps them); returns how many
/// workers they went to.
pub async fn retain_finished_jobs(pool: &PgPool, n: u64) -> Result<usize> {
    let workers: Vec<(String, String)> = sqlx::query_as(
        r#"
SELECT id, worker_type FROM apalis.workers
WHERE worker_type = ANY($1) AND last_seen > now() - interval '1 minute'
"#,
    )
    .bind(vec![
        booking_service::jobs::PLAN_QUEUE,
        booking_service::jobs::DELIVER_QUEUE,
    ])
    .fetch_all(pool)
    .await
    .context("finding the running workers")?;
    if workers.is_empty() {
        bail!("no running follow-up workers to leave finished jobs to");
    }
    let each = i64::try_from(n.div_ceil(workers.len() as u64))?;
    for (worker, queue) in &workers {
        sqlx::query(
            r#"
INSERT INTO apalis.jobs (id, job_type, job, status, attempts, max_attempts,
                         run_at, lock_at, lock_by, done_at, last_result)
SELECT 'retained-' || $1 || '-' || g, $2, '\x7b7d'::bytea, 'Done', 1, 3,
       now() - interval '1 hour', now() - interval '1 hour', $1,
       now() - interval '1 hour', '{"Ok": null}'::jsonb
FROM generate_series(1, $3) AS g
"#,
        )
        .bind(worker)
        .bind(queue)
        .bind(each)
        .execute(pool)
        .await
        .with_context(|| format!("leaving {each} finished jobs to worker {worker}"))?;
    }
    sqlx::query("ANALYZE apalis.jobs")
        .execute(pool)
        .await
        .context("ANALYZE apalis.jobs")?;
    Ok(workers.len())
}

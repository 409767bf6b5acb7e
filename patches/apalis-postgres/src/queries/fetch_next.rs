use apalis_core::worker::context::WorkerContext;
use sqlx::Executor;

use crate::{PgTask, config::Config, error::Error};

/// Fetch the next batch of tasks from the sqlite backend
pub async fn fetch_next<E>(
    conn: &mut E,
    config: &Config,
    worker: &WorkerContext,
) -> Result<Vec<PgTask>, Error>
where
    for<'e> &'e mut E: Executor<'e, Database = sqlx::Postgres>,
{
    use crate::from_row::PgTaskRow;
    let job_type = config.queue.as_ref();
    let buffer_size = config.batch_size as i32;
    let worker = worker.name();

    // maitre patch: a runtime-checked query (the text changed, so the
    // published crate's offline query data no longer matches it).
    sqlx::query(include_str!("../../queries/task/fetch_next.sql"))
        .bind(worker)
        .bind(job_type)
        .bind(buffer_size)
        .fetch_all(conn)
        .await?
        .iter()
        .map(|row| PgTaskRow::from_row(row)?.try_into())
        .collect()
}

//! The poison guard: one job row apalis cannot read must not stop a queue.
//!
//! Where apalis-postgres 1.0 fails on a bad row (read from its sources):
//!
//! - **A job id that is not a ULID.** `fetch_next` runs `apalis.get_jobs`
//!   (marks a batch Queued) and converts each row (`from_row.rs`,
//!   `Ulid::from_string`) before committing: one bad id fails the whole
//!   fetch, the transaction rolls back, the rows stay Pending, the worker
//!   stops — and the next fetch takes the same batch, forever.
//! - **A metadata hstore with a NULL value.** The same conversion unwraps
//!   every value: the fetch *panics*, taking the worker task with it.
//! - **A payload the codec cannot decode** (not JSON, or not this job's
//!   shape). apalis-core's `DurableBackend` decodes after the fetch
//!   committed, and a decode error is a backend error: the worker stops with
//!   the row and the rest of its batch Queued under its name. apalis
//!   re-enqueues a dead worker's jobs without looking at their attempts, so
//!   the row comes back, with its batch, every heartbeat timeout.
//!
//! The guard runs whenever a worker stopped on an error or a panic (the
//! supervisor calls it before the restart). It reads the rows the next fetch
//! would take (the same filter and order as `get_jobs`, up to
//! [`CANDIDATES`]) and the rows the stopped worker held, checks each exactly
//! as apalis would read it (the same `ulid`, hstore and `serde_json` decoding),
//! marks the unreadable ones Killed with their error in `last_result`
//! (counted in `maitre_jobs_dead_lettered_total{queue,reason}`, kept until
//! pruned), and puts the stopped worker's readable rows back to Pending at
//! once rather than after the heartbeat timeout. A valid-looking plan row it
//! kills loses nothing: its booking is still unplanned, so the sweep plans
//! it; a deliver row's follow-up is still PENDING, so the sweep enqueues it.
//!
//! Why a guard and not a patched apalis-postgres (`[patch.crates-io]`): the
//! decode failure is in apalis-core, so the fix would take two forked crates
//! (and their offline query data) carried in the workspace; the guard uses
//! only apalis's table, which its migrations keep stable, and is tested
//! against the real failure. The upstream fix is small and worth proposing:
//! in `fetch_next`, mark rows that fail conversion Killed inside the fetch
//! transaction instead of failing the batch; in `DurableBackend::poll_next`,
//! turn a decode error into a failed task rather than a backend error.
//!
//! This module decides what is unreadable and why; the statements that read,
//! kill and release rows are in `store::poison`.

use serde::de::DeserializeOwned;
use sqlx::{PgPool, postgres::types::PgHstore};

use crate::{metrics::BookingMetrics, store};

/// Rows the guard reads from the head of the queue: many fetch batches, so
/// that a run of bad rows is cleared at once.
pub const CANDIDATES: i64 = 1000;

/// Why apalis cannot read a row: (metric reason, error recorded).
pub fn unreadable<T: DeserializeOwned>(
    id: &str,
    job: &[u8],
    metadata: Option<&PgHstore>,
) -> Option<(&'static str, String)> {
    if let Err(error) = ulid::Ulid::from_string(id) {
        return Some((
            "bad_id",
            format!(
                "poison row: job id {:?} is not a ULID ({error})",
                shorten(id)
            ),
        ));
    }
    if let Some(key) = metadata.and_then(|m| m.iter().find(|(_, v)| v.is_none()).map(|(k, _)| k)) {
        return Some((
            "bad_metadata",
            format!(
                "poison row: metadata key {:?} has a NULL value",
                shorten(key)
            ),
        ));
    }
    if let Err(error) = serde_json::from_slice::<T>(job) {
        return Some((
            "bad_payload",
            format!("poison row: payload does not decode ({error})"),
        ));
    }
    None
}

fn shorten(text: &str) -> String {
    text.chars().take(64).collect()
}

/// Checks the head of `queue` and the rows `stopped_worker` held; kills the
/// unreadable ones and releases the stopped worker's others. Returns how
/// many rows were dead-lettered.
pub async fn guard<T: DeserializeOwned>(
    pool: &PgPool,
    queue: &'static str,
    stopped_worker: &str,
    metrics: &BookingMetrics,
) -> Result<usize, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let mut rows = store::poison::head_of_queue(&mut tx, queue, CANDIDATES).await?;
    rows.extend(store::poison::held_by(&mut tx, queue, stopped_worker).await?);
    let mut killed = Vec::new();
    for row in &rows {
        if let Some((reason, error)) = unreadable::<T>(&row.id, &row.job, row.metadata.as_ref()) {
            store::poison::kill(&mut tx, &row.id, queue, &error).await?;
            tracing::error!(queue, job_id = %shorten(&row.id), reason, %error, "job row apalis cannot read: dead-lettered (status Killed)");
            killed.push((row.id.clone(), reason));
        }
    }
    let killed_ids: Vec<&str> = killed.iter().map(|(id, _)| id.as_str()).collect();
    let released = store::poison::release(&mut tx, queue, stopped_worker, &killed_ids).await?;
    tx.commit().await?;
    for (_, reason) in &killed {
        metrics.dead_lettered(queue, reason);
    }
    if released > 0 {
        tracing::info!(
            queue,
            released,
            "the stopped worker's other jobs are back in the queue"
        );
    }
    Ok(killed.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::PlanFollowUp;

    const GOOD_ID: &str = "01JDQ7Z8X9Y0A1B2C3D4E5F6G7";

    #[test]
    fn reads_rows_as_apalis_does() {
        let payload = serde_json::to_vec(&PlanFollowUp {
            booking_id: uuid::Uuid::now_v7(),
            attempt: 1,
            trace_parent: None,
        })
        .expect("json");
        assert_eq!(unreadable::<PlanFollowUp>(GOOD_ID, &payload, None), None);
        let (reason, error) =
            unreadable::<PlanFollowUp>("not-a-ulid", &payload, None).expect("bad id");
        assert_eq!(reason, "bad_id");
        assert!(error.contains("not-a-ulid"), "{error}");
        assert_eq!(
            unreadable::<PlanFollowUp>(GOOD_ID, b"\xff{", None).map(|v| v.0),
            Some("bad_payload")
        );
        assert_eq!(
            unreadable::<PlanFollowUp>(GOOD_ID, br#"{"attempt": 1}"#, None).map(|v| v.0),
            Some("bad_payload")
        );
        let mut metadata = PgHstore::default();
        metadata.insert("a".into(), Some("b".into()));
        assert_eq!(
            unreadable::<PlanFollowUp>(GOOD_ID, &payload, Some(&metadata)),
            None
        );
        metadata.insert("c".into(), None);
        assert_eq!(
            unreadable::<PlanFollowUp>(GOOD_ID, &payload, Some(&metadata)).map(|v| v.0),
            Some("bad_metadata")
        );
    }
}

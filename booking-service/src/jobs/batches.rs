//! The follow-up job's three statements on the hot path, coalesced across
//! the job runs that reach them together (`coalesce`): the planning read,
//! the insert of the follow-up born claimed, and the finish after the
//! message is stored. Each run's outcome is what the one-row statement
//! would have given it. The writes run in a short transaction whose row-lock
//! waits end after 50 ms: a row someone else holds (a cancel or an erasure
//! in flight) sends the batch's runs through the one-row statement, where
//! only the run of that row waits, as it always did. So does a row the
//! database refuses, and a second run for the same row in one batch (jobs
//! run at least once). With `BOOKING_WORKER_BATCH_MAX=0` every run uses
//! the one-row statements.

use std::{borrow::Cow, collections::HashMap, sync::Arc, time::Duration};

use sqlx::PgPool;
use uuid::Uuid;

use super::coalesce::{Answer, Batch, Coalescer, SizeObserver};
use crate::{
    metrics::BookingMetrics,
    store::{self, followups::NewFollowUp, planning::ToPlan},
};

/// Flusher tasks per statement: one batch can be in flight while the next
/// one fills.
const FLUSHERS: usize = 2;

/// A follow-up to insert born claimed by `token`.
type ClaimedInsert = (NewFollowUp, Uuid);
/// A stored follow-up to finish: (id, claim token, stored message id).
type SentFinish = (Uuid, Uuid, Uuid);

/// How the job runs reach the hot statements: coalesced across runs, or
/// one by one. Cheap to clone.
#[derive(Clone)]
pub struct HotStatements {
    pool: PgPool,
    /// The claim lease of a follow-up inserted born claimed.
    lease: Duration,
    coalesced: Option<Arc<Coalescers>>,
}

struct Coalescers {
    to_plan: Coalescer<Uuid, Option<ToPlan>>,
    insert_claimed: Coalescer<ClaimedInsert, Option<i16>>,
    finish_sent: Coalescer<SentFinish, Option<i16>>,
}

impl HotStatements {
    /// Statements on `pool`, coalesced `max_batch` runs at most (0: one by
    /// one). Coalescing starts tasks: call inside the runtime.
    pub fn new(
        pool: PgPool,
        lease: Duration,
        max_batch: usize,
        metrics: Arc<BookingMetrics>,
    ) -> Self {
        let coalesced =
            (max_batch > 0).then(|| Arc::new(Coalescers::spawn(&pool, max_batch, lease, metrics)));
        Self {
            pool,
            lease,
            coalesced,
        }
    }

    /// [`store::planning::to_plan`].
    pub async fn to_plan(&self, booking_id: Uuid) -> Result<Option<ToPlan>, sqlx::Error> {
        if let Some(coalesced) = &self.coalesced
            && let Answer::Done(result) = coalesced.to_plan.call(booking_id).await
        {
            return result;
        }
        store::planning::to_plan(&self.pool, booking_id).await
    }

    /// [`store::followups::insert_planned`], born claimed by `token`.
    pub async fn insert_claimed(
        &self,
        follow_up: &NewFollowUp,
        token: Uuid,
    ) -> Result<Option<i16>, sqlx::Error> {
        if let Some(coalesced) = &self.coalesced
            && let Answer::Done(result) = coalesced
                .insert_claimed
                .call((follow_up.clone(), token))
                .await
        {
            return result;
        }
        let mut conn = self.pool.acquire().await?;
        let claim = Some((token, self.lease));
        store::followups::insert_planned(&mut conn, follow_up, maitre_runtime::db::now(), claim)
            .await
    }

    /// [`store::followups::finish_sent`], at the database's time.
    pub async fn finish_sent(
        &self,
        id: Uuid,
        token: Uuid,
        message_id: Uuid,
    ) -> Result<Option<i16>, sqlx::Error> {
        if let Some(coalesced) = &self.coalesced
            && let Answer::Done(result) = coalesced.finish_sent.call((id, token, message_id)).await
        {
            return result;
        }
        let now = maitre_runtime::db::now();
        store::followups::finish_sent(&self.pool, id, token, message_id, now).await
    }
}

impl Coalescers {
    fn spawn(
        pool: &PgPool,
        max_batch: usize,
        lease: Duration,
        metrics: Arc<BookingMetrics>,
    ) -> Self {
        let observer = |statement: &'static str| -> SizeObserver {
            let metrics = metrics.clone();
            Arc::new(move |size| metrics.batch_size(statement, size))
        };
        let to_plan = Coalescer::spawn(FLUSHERS, max_batch, observer("to_plan"), {
            let pool = pool.clone();
            move |batch: Batch<Uuid>| Box::pin(read_to_plan(pool.clone(), batch))
        });
        let insert_claimed = Coalescer::spawn(FLUSHERS, max_batch, observer("insert_planned"), {
            let pool = pool.clone();
            move |batch: Batch<ClaimedInsert>| {
                Box::pin(insert_claimed_batch(pool.clone(), batch, lease))
            }
        });
        let finish_sent = Coalescer::spawn(FLUSHERS, max_batch, observer("finish_sent"), {
            let pool = pool.clone();
            move |batch: Batch<SentFinish>| Box::pin(finish_sent_batch(pool.clone(), batch))
        });
        Self {
            to_plan,
            insert_claimed,
            finish_sent,
        }
    }
}

/// A read takes no lock: every booking is answered, found or not.
async fn read_to_plan(pool: PgPool, batch: Batch<Uuid>) -> Vec<Answer<Option<ToPlan>>> {
    match store::planning::to_plan_many(&pool, &batch.inputs, &batch.recorders).await {
        Ok(rows) => {
            let found: HashMap<Uuid, ToPlan> = rows.into_iter().map(|r| (r.id, r)).collect();
            batch
                .inputs
                .iter()
                .map(|id| Answer::Done(Ok(found.get(id).cloned())))
                .collect()
        }
        Err(error) => after_failure(
            BatchError::BeforeCommit(error),
            "planning::to_plan_many",
            batch.inputs.len(),
        ),
    }
}

async fn insert_claimed_batch(
    pool: PgPool,
    batch: Batch<ClaimedInsert>,
    lease: Duration,
) -> Vec<Answer<Option<i16>>> {
    // One row per booking and trigger in a statement; a second run of the
    // same job (rare: jobs run at least once) goes alone.
    let (rows, first) = first_per_key(&batch.inputs, |(f, _)| (f.booking_id, f.trigger));
    let now = maitre_runtime::db::now();
    let written = async {
        let mut tx = pool.begin_with(BEGIN_BATCH).await?;
        let inserted =
            store::followups::insert_claimed_many(&mut tx, &rows, now, lease, &batch.recorders)
                .await?;
        Ok((tx, inserted))
    };
    match committed(written.await).await {
        Ok(inserted) => {
            let inserted: HashMap<Uuid, i16> = inserted.into_iter().collect();
            answer_firsts(&batch.inputs, first, |(f, _)| inserted.get(&f.id).copied())
        }
        Err(error) => after_failure(error, "followups::INSERT_CLAIMED_MANY", batch.inputs.len()),
    }
}

async fn finish_sent_batch(pool: PgPool, batch: Batch<SentFinish>) -> Vec<Answer<Option<i16>>> {
    let (rows, first) = first_per_key(&batch.inputs, |(id, _, _)| *id);
    let now = maitre_runtime::db::now();
    let written = async {
        let mut tx = pool.begin_with(BEGIN_BATCH).await?;
        let finished =
            store::followups::finish_sent_many(&mut tx, &rows, now, &batch.recorders).await?;
        Ok((tx, finished))
    };
    match committed(written.await).await {
        Ok(finished) => {
            let finished: HashMap<Uuid, i16> = finished.into_iter().collect();
            answer_firsts(&batch.inputs, first, |(id, _, _)| finished.get(id).copied())
        }
        Err(error) => after_failure(error, "followups::finish_sent_many", batch.inputs.len()),
    }
}

/// How a coalesced write's transaction begins: with a short lock timeout,
/// in the same round trip. Each wait of a batch for a row someone else
/// holds (a cancel, an erasure) ends after this long; then each of its runs
/// goes alone and waits as it always did, so one held row never holds up
/// the others for longer, and a batch never waits long enough to deadlock.
const BEGIN_BATCH: &str = "BEGIN; SET LOCAL lock_timeout = '50ms'";

/// Commits a batch's transaction once its statement answered. An error
/// before COMMIT wrote nothing (the transaction rolls back as it drops); a
/// failed COMMIT is reported as such: the outcome is unknown.
async fn committed<T>(
    written: Result<(sqlx::Transaction<'static, sqlx::Postgres>, T), sqlx::Error>,
) -> Result<T, BatchError> {
    let (tx, answer) = written.map_err(BatchError::BeforeCommit)?;
    tx.commit().await.map_err(BatchError::AtCommit)?;
    Ok(answer)
}

/// Why a coalesced statement gave no answer.
#[derive(Debug, thiserror::Error)]
enum BatchError {
    /// Nothing was written.
    #[error("{0}")]
    BeforeCommit(sqlx::Error),
    /// COMMIT failed: written or not, nobody knows.
    #[error("at commit: {0}")]
    AtCommit(sqlx::Error),
}

/// Each run's answer: the statement's row for a run that was in it, none
/// when the statement left its row alone, and [`Answer::Alone`] for a
/// second run of the same row.
fn answer_firsts<T>(
    inputs: &[T],
    first: Vec<bool>,
    row: impl Fn(&T) -> Option<i16>,
) -> Vec<Answer<Option<i16>>> {
    inputs
        .iter()
        .zip(first)
        .map(|(input, first)| match first {
            true => Answer::Done(Ok(row(input))),
            false => Answer::Alone,
        })
        .collect()
}

/// The inputs whose key is the first of its kind in the batch, for the
/// statement (the inputs themselves in the usual case of no repeat, copies
/// of the firsts otherwise), and for every input whether it is one of them.
fn first_per_key<T: Clone, K: Eq + std::hash::Hash>(
    inputs: &[T],
    key: impl Fn(&T) -> K,
) -> (Cow<'_, [T]>, Vec<bool>) {
    let mut seen = std::collections::HashSet::with_capacity(inputs.len());
    let first: Vec<bool> = inputs.iter().map(|input| seen.insert(key(input))).collect();
    if first.iter().all(|&first| first) {
        return (Cow::Borrowed(inputs), first);
    }
    let rows = inputs
        .iter()
        .zip(&first)
        .filter(|(_, first)| **first)
        .map(|(input, _)| input.clone())
        .collect();
    (Cow::Owned(rows), first)
}

/// A coalesced statement failed. When the failure may be one row's (data
/// the database refuses, a lock held past the batch's wait, a deadlock),
/// nothing was written and each run goes alone, so the error, or the wait,
/// reaches only the run it belongs to. Anything else (the pool or the
/// connection failing, a statement timeout: with row-lock waits cut at
/// 50 ms, that is a database in trouble, not a row) is every run's error,
/// and its job runs again: sending each run on alone would only multiply
/// the requests on a pool or a database already in trouble. A failed
/// COMMIT is every run's error too: the outcome is unknown, and the job
/// runs again (at least once), as after any statement whose answer was
/// lost.
fn after_failure<O>(error: BatchError, statement: &str, runs: usize) -> Vec<Answer<O>> {
    if let BatchError::BeforeCommit(cause) = &error
        && may_be_one_rows(cause)
    {
        tracing::info!(%error, statement, runs, "a coalesced statement failed on a row; each run retries it alone");
        return (0..runs).map(|_| Answer::Alone).collect();
    }
    tracing::warn!(%error, statement, runs, "a coalesced statement failed; each run gets the error");
    (0..runs)
        .map(|_| {
            Answer::Done(Err(sqlx::Error::Protocol(format!(
                "{statement} (coalesced): {error}"
            ))))
        })
        .collect()
}

/// SQLSTATE classes 22 (data exception) and 23 (integrity constraint),
/// deadlock, serialization failure, lock not available.
fn may_be_one_rows(error: &sqlx::Error) -> bool {
    let Some(code) = error.as_database_error().and_then(|e| e.code()) else {
        return false;
    };
    code.starts_with("22")
        || code.starts_with("23")
        || matches!(code.as_ref(), "40P01" | "40001" | "55P03")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_run_for_the_same_row_goes_alone() {
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let inputs = [(b, 1), (a, 2), (b, 3)];
        let (rows, first) = first_per_key(&inputs, |(key, _)| *key);
        assert_eq!(rows.as_ref(), [(b, 1), (a, 2)], "one row per key");
        assert_eq!(first, vec![true, true, false]);
        let (rows, _) = first_per_key(&inputs[..2], |(key, _)| *key);
        assert!(matches!(rows, Cow::Borrowed(_)), "no repeat: no copy");
    }
}

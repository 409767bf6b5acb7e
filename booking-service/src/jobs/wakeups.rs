//! Waking the follow-up workers without a NOTIFY in every booking.
//!
//! apalis-postgres wakes workers with a per-row trigger that calls
//! `pg_notify` inside the inserting transaction. PostgreSQL serialises the
//! commits of all transactions that notified (one global lock at commit),
//! which capped CreateBooking at ~265 bookings/s (968/s without the
//! trigger). Our migration drops that trigger; instead whoever commits due
//! work calls [`Wakeups::poke`] afterwards:
//!
//! - the worker of that queue in this process wakes at once;
//! - one background task tells the other replicas, with at most one
//!   `NOTIFY` statement in flight and at most one per [`COALESCE`] (pokes in
//!   between share it);
//! - each replica listens on one connection and wakes its own worker,
//!   ignoring its own notifications.
//!
//! Work due later gets a wake-up at its due time. Every worker process reads
//! the due times of the next ten minutes from the queue table once a minute
//! ([`Wakeups::arm_upcoming_until`]) and sets a local timer for each, so a
//! booking's follow-up job, due a day or a month after it was enqueued (by
//! whichever replica), starts on time. Work committed to come due within
//! those ten minutes also sets its timer at once: a booking's follow-up job
//! wakes every replica's workers ([`Wakeups::poke_at`]: the booking may have
//! been taken by a replica without workers), a retry or a delivery planned
//! ahead wakes the local worker ([`Wakeups::wake_at`]). apalis's interval
//! polling was seen to stall for seconds, and 2,000 deliveries due together
//! waited for it. What nobody announces (rows written by hand,
//! another replica's work) is found by polling
//! (`BOOKING_WORKER_POLL_INTERVAL`), as before.

use std::{
    collections::BTreeSet,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::{DateTime, Utc};
use futures::stream::{self, Stream};
use sqlx::{PgPool, postgres::PgListener};
use tokio::sync::{Notify, watch};

use super::{DELIVER_QUEUE, PLAN_QUEUE};

/// The channel replicas notify each other on; the payload is
/// `<queue> <instance>` (the sender's instance, so it can skip its own).
pub const CHANNEL: &str = "maitre_followup_jobs";

/// Shortest time between two NOTIFY statements of one process.
pub const COALESCE: Duration = Duration::from_millis(5);

/// Most due times waited for at once; beyond them, polling finds the work.
const MAX_TIMED_WAKEUPS: usize = 10_000;

/// Work due further ahead than this gets no timer; polling finds it.
const TIMED_HORIZON: chrono::TimeDelta = chrono::TimeDelta::minutes(10);

/// Whom a timed wake-up wakes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Reach {
    /// This process's worker of the queue.
    Local,
    /// Every replica's (a coalesced NOTIFY).
    AllReplicas,
}

/// How often a worker process reads the due times of the next
/// [`TIMED_HORIZON`] from the queue table, to set its timers.
pub const UPCOMING_SCAN_INTERVAL: Duration = Duration::from_secs(60);

/// How long to wait before listening again after the listener failed.
const RELISTEN_DELAY: Duration = Duration::from_secs(1);

/// What a worker's poll strategy reads: one item per wake-up (apalis wants
/// it `Sync`).
pub type WakeStream = Pin<Box<dyn Stream<Item = ()> + Send + Sync>>;

/// Wake-ups of the plan and deliver workers, local and across replicas.
#[derive(Debug, Clone)]
pub struct Wakeups {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Identifies this process in payloads.
    instance: String,
    plan: Notify,
    deliver: Notify,
    /// Due times (ms since the epoch, queue, reach) a wake-up waits for.
    timed: Mutex<BTreeSet<(i64, &'static str, Reach)>>,
    /// Queues poked since the last NOTIFY went out.
    unsent: Mutex<BTreeSet<&'static str>>,
    send: Notify,
}

impl Inner {
    /// The wake-up of `queue`'s worker in this process.
    fn notify(&self, queue: &str) -> Option<&Notify> {
        match queue {
            PLAN_QUEUE => Some(&self.plan),
            DELIVER_QUEUE => Some(&self.deliver),
            _ => None,
        }
    }
}

impl Default for Wakeups {
    fn default() -> Self {
        Self::new()
    }
}

impl Wakeups {
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                instance: uuid::Uuid::now_v7().simple().to_string(),
                plan: Notify::new(),
                deliver: Notify::new(),
                timed: Mutex::new(BTreeSet::new()),
                unsent: Mutex::new(BTreeSet::new()),
                send: Notify::new(),
            }),
        }
    }

    /// Due work was committed to `queue`: wake its workers here and elsewhere.
    pub fn poke(&self, queue: &'static str) {
        self.wake_local(queue);
        if let Ok(mut unsent) = self.inner.unsent.lock() {
            unsent.insert(queue);
        }
        self.inner.send.notify_one();
    }

    /// Work committed to `queue` comes due at `at`: wake this process's
    /// worker then (once per due time and queue, however many jobs share
    /// it). Local only: for work this process's own worker scheduled (a
    /// delivery, a retry); whichever replica's worker comes first fetches it.
    pub fn wake_at(&self, queue: &'static str, at: DateTime<Utc>) {
        self.timer(queue, at, Reach::Local);
    }

    /// Work committed to `queue` comes due at `at`: at that time, wake the
    /// workers here and on the other replicas (one coalesced NOTIFY), as
    /// [`Wakeups::poke`] does. For work committed by the API, which may run
    /// on a replica without workers (a booking's follow-up job, due at the
    /// event's end).
    pub fn poke_at(&self, queue: &'static str, at: DateTime<Utc>) {
        self.timer(queue, at, Reach::AllReplicas);
    }

    fn timer(&self, queue: &'static str, at: DateTime<Utc>, reach: Reach) {
        let until = at - Utc::now();
        if until > TIMED_HORIZON {
            // Polling finds it: a timer per far-off event would crowd out
            // the near ones.
            return;
        }
        let key = (at.timestamp_millis(), queue, reach);
        let Ok(mut timed) = self.inner.timed.lock() else {
            return;
        };
        if timed.len() >= MAX_TIMED_WAKEUPS || !timed.insert(key) {
            return;
        }
        drop(timed);
        let wakeups = self.clone();
        // A millisecond after the due time: apalis fetches `run_at < now()`.
        let delay = until.to_std().unwrap_or_default() + Duration::from_millis(1);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            if let Ok(mut timed) = wakeups.inner.timed.lock() {
                timed.remove(&key);
            }
            match reach {
                Reach::Local => wakeups.wake_local(queue),
                Reach::AllReplicas => wakeups.poke(queue),
            }
        });
    }

    /// Sets a local timer for every due time of the plan and deliver queues
    /// within [`TIMED_HORIZON`], read from the queue table: work enqueued by
    /// anyone (another replica, this process before a restart, a booking
    /// made days ago) wakes this process's workers when it comes due.
    /// Returns how many due times were read.
    pub async fn arm_upcoming(&self, pool: &PgPool) -> Result<usize, sqlx::Error> {
        let horizon = TIMED_HORIZON.to_std().unwrap_or_default();
        let limit = i64::try_from(MAX_TIMED_WAKEUPS).unwrap_or(i64::MAX);
        let due =
            crate::store::jobs::due_within(pool, &[PLAN_QUEUE, DELIVER_QUEUE], horizon, limit)
                .await?;
        for (queue, at) in &due {
            match queue.as_str() {
                PLAN_QUEUE => self.wake_at(PLAN_QUEUE, *at),
                DELIVER_QUEUE => self.wake_at(DELIVER_QUEUE, *at),
                _ => {}
            }
        }
        Ok(due.len())
    }

    /// [`Wakeups::arm_upcoming`] now and every [`UPCOMING_SCAN_INTERVAL`]
    /// until `stop` (a worker process's task).
    pub async fn arm_upcoming_until(self, pool: PgPool, mut stop: watch::Receiver<bool>) {
        let mut failing = false;
        loop {
            match self.arm_upcoming(&pool).await {
                Ok(_) if failing => {
                    failing = false;
                    tracing::info!("reading upcoming job due times again");
                }
                Ok(_) => {}
                Err(error) if !failing => {
                    failing = true;
                    tracing::warn!(%error, "cannot read upcoming job due times; polling finds the jobs meanwhile");
                }
                Err(_) => {}
            }
            tokio::select! {
                _ = tokio::time::sleep(UPCOMING_SCAN_INTERVAL) => {}
                _ = stop.wait_for(|stopping| *stopping) => return,
            }
        }
    }

    /// A stream that yields each time `queue`'s worker should fetch: the
    /// apalis poll strategy of that worker. Wake-ups while nobody waits are
    /// kept as one.
    pub fn stream(&self, queue: &'static str) -> WakeStream {
        Box::pin(stream::unfold(
            self.inner.clone(),
            move |inner| async move {
                match inner.notify(queue) {
                    Some(notify) => notify.notified().await,
                    None => std::future::pending().await,
                }
                Some(((), inner))
            },
        ))
    }

    fn wake_local(&self, queue: &str) {
        if let Some(notify) = self.inner.notify(queue) {
            notify.notify_one();
        }
    }

    /// Sends the coalesced notifications until `stop`, one short statement
    /// on `pool` at a time. Runs whether or not this process has workers:
    /// an API-only replica still wakes the others.
    pub async fn send_until(self, pool: PgPool, mut stop: watch::Receiver<bool>) {
        let mut failing = false;
        loop {
            tokio::select! {
                _ = self.inner.send.notified() => {}
                _ = stop.wait_for(|stopping| *stopping) => return,
            }
            let queues: Vec<String> = match self.inner.unsent.lock() {
                Ok(mut unsent) => std::mem::take(&mut *unsent)
                    .into_iter()
                    .map(|queue| format!("{queue} {}", self.inner.instance))
                    .collect(),
                Err(_) => return,
            };
            if queues.is_empty() {
                continue;
            }
            let sent =
                sqlx::query(r#"SELECT pg_notify($1, payload) FROM unnest($2::text[]) AS payload"#)
                    .bind(CHANNEL)
                    .bind(&queues)
                    .execute(&pool)
                    .await;
            match sent {
                Ok(_) if failing => {
                    failing = false;
                    tracing::info!("job wake-ups reach the other replicas again");
                }
                Ok(_) => {}
                Err(error) if !failing => {
                    failing = true;
                    tracing::warn!(%error, "cannot notify the other replicas of new jobs; they find them by polling");
                }
                Err(_) => {}
            }
            tokio::time::sleep(COALESCE).await;
        }
    }

    /// Listens for the other replicas' notifications until `stop`, waking
    /// the local workers; listens again after a failure.
    pub async fn listen_until(self, pool: PgPool, mut stop: watch::Receiver<bool>) {
        loop {
            let listened = tokio::select! {
                result = self.listen(&pool) => result,
                _ = stop.wait_for(|stopping| *stopping) => return,
            };
            if let Err(error) = listened {
                tracing::warn!(%error, "not listening for job wake-ups; polling meanwhile, listening again in 1 s");
            }
            tokio::select! {
                _ = tokio::time::sleep(RELISTEN_DELAY) => {}
                _ = stop.wait_for(|stopping| *stopping) => return,
            }
        }
    }

    async fn listen(&self, pool: &PgPool) -> Result<(), sqlx::Error> {
        let mut listener = PgListener::connect_with(pool).await?;
        listener.listen(CHANNEL).await?;
        // A notification missed while (re)connecting is work the next poll finds.
        loop {
            let notification = listener.recv().await?;
            if let Some((queue, sender)) = notification.payload().split_once(' ')
                && sender != self.inner.instance
            {
                self.wake_local(queue);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    #[tokio::test]
    async fn a_poke_wakes_its_queue_once_however_often_it_came() {
        let wakeups = Wakeups::new();
        let mut plan = wakeups.stream(PLAN_QUEUE);
        let mut deliver = wakeups.stream(DELIVER_QUEUE);
        wakeups.poke(PLAN_QUEUE);
        wakeups.poke(PLAN_QUEUE);
        let woke = tokio::time::timeout(Duration::from_secs(1), plan.next()).await;
        assert_eq!(woke, Ok(Some(())));
        let again = tokio::time::timeout(Duration::from_millis(50), plan.next()).await;
        assert!(again.is_err(), "two pokes before the fetch are one wake-up");
        let other = tokio::time::timeout(Duration::from_millis(50), deliver.next()).await;
        assert!(other.is_err(), "the deliver worker was not poked");
    }

    #[tokio::test]
    async fn work_due_beyond_the_horizon_is_left_to_polling() {
        let wakeups = Wakeups::new();
        wakeups.poke_at(PLAN_QUEUE, Utc::now() + chrono::Duration::days(1));
        wakeups.wake_at(DELIVER_QUEUE, Utc::now() + chrono::Duration::minutes(11));
        assert_eq!(wakeups.inner.timed.lock().map(|t| t.len()).ok(), Some(0));
        wakeups.poke_at(PLAN_QUEUE, Utc::now() + chrono::Duration::minutes(9));
        assert_eq!(wakeups.inner.timed.lock().map(|t| t.len()).ok(), Some(1));
    }

    #[tokio::test]
    async fn a_timed_poke_wakes_the_local_worker_and_queues_a_notify_at_the_due_time() {
        let wakeups = Wakeups::new();
        let mut plan = wakeups.stream(PLAN_QUEUE);
        let due = Utc::now() + chrono::Duration::milliseconds(200);
        wakeups.poke_at(PLAN_QUEUE, due);
        assert!(
            wakeups
                .inner
                .unsent
                .lock()
                .map(|u| u.is_empty())
                .unwrap_or(false)
        );
        let woke = tokio::time::timeout(Duration::from_secs(5), plan.next()).await;
        assert_eq!(woke, Ok(Some(())));
        assert!(Utc::now() > due, "not before the due time");
        let unsent = wakeups
            .inner
            .unsent
            .lock()
            .map(|u| u.clone())
            .unwrap_or_default();
        assert!(
            unsent.contains(PLAN_QUEUE),
            "a NOTIFY for the other replicas: {unsent:?}"
        );
    }

    #[tokio::test]
    async fn work_due_later_wakes_its_queue_at_the_due_time_once() {
        let wakeups = Wakeups::new();
        let mut deliver = wakeups.stream(DELIVER_QUEUE);
        let due = Utc::now() + chrono::Duration::milliseconds(300);
        for _ in 0..1000 {
            wakeups.wake_at(DELIVER_QUEUE, due);
        }
        assert_eq!(wakeups.inner.timed.lock().map(|t| t.len()).ok(), Some(1));
        let woke = tokio::time::timeout(Duration::from_secs(5), deliver.next()).await;
        assert_eq!(woke, Ok(Some(())));
        assert!(Utc::now() > due, "not before the due time");
        let again = tokio::time::timeout(Duration::from_millis(100), deliver.next()).await;
        assert!(
            again.is_err(),
            "one wake-up for the 1,000 jobs due together"
        );
    }
}

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
//! Work committed for later (a delivery due at the event's end, a retry)
//! gets a local wake-up at its due time ([`Wakeups::wake_at`]): apalis's
//! interval polling was seen to stall for seconds, and 2,000 deliveries due
//! together waited for it. What nobody announces (rows written by hand,
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
    /// Due times (ms since the epoch, queue) a local wake-up waits for.
    timed: Mutex<BTreeSet<(i64, &'static str)>>,
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
    /// it). Local only: the job is fetched by whichever replica's worker
    /// comes first, and one is enough.
    pub fn wake_at(&self, queue: &'static str, at: DateTime<Utc>) {
        let key = (at.timestamp_millis(), queue);
        let Ok(mut timed) = self.inner.timed.lock() else {
            return;
        };
        if timed.len() >= MAX_TIMED_WAKEUPS || !timed.insert(key) {
            return;
        }
        drop(timed);
        let wakeups = self.clone();
        // A millisecond after the due time: apalis fetches `run_at < now()`.
        let delay = (at - Utc::now()).to_std().unwrap_or_default() + Duration::from_millis(1);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            if let Ok(mut timed) = wakeups.inner.timed.lock() {
                timed.remove(&key);
            }
            wakeups.wake_local(queue);
        });
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

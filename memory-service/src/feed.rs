//! The message feed's moving parts in a replica: the sequencer task that
//! numbers committed messages ([`crate::store::feed::sequence`]) and drops
//! old positions, the feed's end as last seen (which wakes the watchers),
//! and the count of open WatchMessages streams (their limits).
//!
//! A local StoreMessage nudges the sequencer, which then runs a round at
//! most every [`ROUND_GAP`]; without nudges (messages stored through another
//! replica, which sequences them itself) it runs every `poll_interval`, which
//! is also how this replica's watchers learn of them.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use sqlx::PgPool;
use tokio::sync::{Notify, Semaphore, SemaphorePermit, watch};

use crate::{
    error::Error,
    store::{self, feed::Round},
};

/// The least time between two rounds: under load, one round numbers what
/// many commits stored.
const ROUND_GAP: Duration = Duration::from_millis(5);

/// How long to wait before trying again when another replica's round held
/// the lock (its round may have begun before this replica's commit).
const BUSY_RETRY: Duration = Duration::from_millis(25);

/// Watchers' page reads at once on a replica: the rest wait their turn, so
/// however many streams are open they hold a few pooled connections and
/// never the writers'. A waiting watcher reads more at once when its turn
/// comes.
const CONCURRENT_READS: usize = 4;

/// How often retention looks for positions to drop (more often when the
/// retention is shorter), and how many one statement drops at most.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
const PRUNE_BATCH: i64 = 10_000;
const PRUNE_BATCHES_PER_VISIT: usize = 10;

/// How the feed and its watchers run (the defaults are the flags', in
/// `config.rs`).
#[derive(Debug, Clone)]
pub struct FeedSettings {
    /// How often the feed is sequenced and its end read when no local write
    /// prompts it.
    pub poll_interval: Duration,
    /// How long positions are kept; older cursors have expired.
    pub retention: Duration,
    /// How often an idle stream gets a heartbeat.
    pub heartbeat: Duration,
    /// How long a stream may stay full before it is ended.
    pub stall_timeout: Duration,
    /// Messages held for a stream its client has not read yet.
    pub buffer: usize,
    /// Open streams at most, in all and per caller.
    pub max_streams: usize,
    pub max_streams_per_caller: usize,
}

/// What the feed reports to `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct FeedMetrics {
    /// Messages numbered by this replica's sequencer.
    pub sequenced: Counter,
    /// WatchMessages streams open on this replica.
    pub watchers: Gauge,
    /// Streams ended because their client read too slowly.
    pub too_slow: Counter,
}

/// The feed of one replica; cheap to clone.
#[derive(Debug, Clone)]
pub struct Feed {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    pool: PgPool,
    settings: FeedSettings,
    metrics: FeedMetrics,
    nudge: Notify,
    /// The last position known to be committed.
    end: watch::Sender<i64>,
    /// Open streams per caller.
    streams: Mutex<HashMap<String, usize>>,
    /// Turns true when the server stops: every stream ends.
    stop: watch::Sender<bool>,
    /// Turns for the watchers' page reads.
    reads: Semaphore,
}

/// An open stream's place in the limits, given back when dropped.
#[derive(Debug)]
pub struct StreamSlot {
    inner: Arc<Inner>,
    caller: String,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut streams = self
            .inner
            .streams
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(open) = streams.get_mut(&self.caller) {
            *open -= 1;
            if *open == 0 {
                streams.remove(&self.caller);
            }
        }
        self.inner.metrics.watchers.dec();
    }
}

impl Feed {
    pub fn new(pool: PgPool, settings: FeedSettings, metrics: FeedMetrics) -> Self {
        let (end, _) = watch::channel(0);
        Self {
            inner: Arc::new(Inner {
                pool,
                settings,
                metrics,
                nudge: Notify::new(),
                end,
                streams: Mutex::new(HashMap::new()),
                stop: watch::channel(false).0,
                reads: Semaphore::new(CONCURRENT_READS),
            }),
        }
    }

    pub fn settings(&self) -> &FeedSettings {
        &self.inner.settings
    }

    pub fn metrics(&self) -> &FeedMetrics {
        &self.inner.metrics
    }

    /// Messages were committed here: sequence them soon.
    pub fn nudge(&self) {
        self.inner.nudge.notify_one();
    }

    /// The feed's end as last seen; changes when a round moves it.
    pub fn end(&self) -> watch::Receiver<i64> {
        self.inner.end.subscribe()
    }

    /// Waits for a turn to read the feed (see [`CONCURRENT_READS`]).
    pub async fn read_turn(&self) -> Option<SemaphorePermit<'_>> {
        // The semaphore is never closed; `None` would only let the read go.
        self.inner.reads.acquire().await.ok()
    }

    /// Turns true when the server stops.
    pub fn stopping(&self) -> watch::Receiver<bool> {
        self.inner.stop.subscribe()
    }

    /// Records a feed end read elsewhere (a watcher's own read).
    pub fn saw_end(&self, last_pos: i64) {
        self.inner.end.send_if_modified(|end| {
            let newer = last_pos > *end;
            if newer {
                *end = last_pos;
            }
            newer
        });
    }

    /// Takes a stream slot for `caller`, or refuses past the limits.
    pub fn open_stream(&self, caller: &str) -> Result<StreamSlot, Error> {
        let settings = &self.inner.settings;
        let mut streams = self
            .inner
            .streams
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let total: usize = streams.values().sum();
        let mine = streams.get(caller).copied().unwrap_or(0);
        if total >= settings.max_streams {
            return Err(Error::TooManyWatchers {
                limit: settings.max_streams,
                per_caller: false,
            });
        }
        if mine >= settings.max_streams_per_caller {
            return Err(Error::TooManyWatchers {
                limit: settings.max_streams_per_caller,
                per_caller: true,
            });
        }
        *streams.entry(caller.to_owned()).or_insert(0) += 1;
        self.inner.metrics.watchers.inc();
        Ok(StreamSlot {
            inner: self.inner.clone(),
            caller: caller.to_owned(),
        })
    }

    /// The sequencer and retention, until `stopping` turns true.
    pub async fn run(self, mut stopping: watch::Receiver<bool>) {
        let inner = &self.inner;
        // Streams end as soon as the server stops, whatever a round is doing.
        tokio::spawn({
            let inner = inner.clone();
            let mut stopping = stopping.clone();
            async move {
                stopped(&mut stopping).await;
                inner.stop.send_replace(true);
            }
        });
        let mut next_prune = tokio::time::Instant::now();
        let mut went_back_reported = false;
        loop {
            tokio::select! {
                () = stopped(&mut stopping) => return,
                () = inner.nudge.notified() => {}
                () = tokio::time::sleep(inner.settings.poll_interval) => {}
            }
            let round = tokio::select! {
                () = stopped(&mut stopping) => return,
                round = store::feed::sequence(&inner.pool) => round,
            };
            let pause = match round {
                Ok(Round::Done { last_pos, numbered }) => {
                    inner.metrics.sequenced.inc_by(numbered.unsigned_abs());
                    self.saw_end(last_pos);
                    ROUND_GAP
                }
                Ok(Round::IdsWentBack { last_pos }) => {
                    self.saw_end(last_pos);
                    if !went_back_reported {
                        went_back_reported = true;
                        tracing::error!(
                            last_pos,
                            "the message feed is stuck: the database's transaction ids are behind \
                             the feed's last snapshot (restored or replaced database?); new \
                             messages are not fed until it is reset (README, Operations: \
                             resetting the message feed)"
                        );
                    }
                    inner.settings.poll_interval
                }
                // Another replica's round may have begun before this
                // replica's commit: go again shortly.
                Ok(Round::Busy) => {
                    inner.nudge.notify_one();
                    BUSY_RETRY
                }
                Err(error) => {
                    tracing::warn!(%error, "feed sequencing failed; retrying");
                    inner.settings.poll_interval
                }
            };
            if tokio::time::Instant::now() >= next_prune {
                self.prune(&stopping).await;
                // At least as often as positions expire.
                next_prune =
                    tokio::time::Instant::now() + PRUNE_EVERY.min(inner.settings.retention);
            }
            tokio::select! {
                () = stopped(&mut stopping) => return,
                () = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Drops positions older than the retention, a batch at a time.
    async fn prune(&self, stopping: &watch::Receiver<bool>) {
        let inner = &self.inner;
        let Ok(retention) = chrono::Duration::from_std(inner.settings.retention) else {
            return;
        };
        let cutoff = maitre_runtime::db::now() - retention;
        // A few batches per visit: after the retention was shortened, the
        // rest waits for the next visits, and rounds go on in between.
        for _ in 0..PRUNE_BATCHES_PER_VISIT {
            if *stopping.borrow() {
                return;
            }
            match store::feed::prune(&inner.pool, cutoff, PRUNE_BATCH).await {
                Ok(Some(dropped)) if dropped == PRUNE_BATCH => continue,
                Ok(Some(dropped)) => {
                    if dropped > 0 {
                        tracing::info!(dropped, "old feed positions dropped (retention)");
                    }
                    return;
                }
                Ok(None) => return,
                Err(error) => {
                    tracing::warn!(%error, "feed retention failed; retrying later");
                    return;
                }
            }
        }
    }
}

/// Resolves once `stopping` turns true (or its sender is gone).
pub async fn stopped(stopping: &mut watch::Receiver<bool>) {
    let _ = stopping.wait_for(|s| *s).await;
}

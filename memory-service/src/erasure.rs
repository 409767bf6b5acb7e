//! DeleteUserData's work and the background purger that finishes it.
//!
//! An erasure is done in two steps (see [`crate::store::erasure`]): the
//! user's conversations are tombstoned at once, one statement, so they are
//! gone for every RPC from that moment; their rows are purged afterwards in
//! short batches. DeleteUserData purges until its own deadline draws near and
//! then answers with what it did and what is left; the [`Purger`], a task of
//! every memory-service replica, finishes any erased-but-unpurged
//! conversation, so completion never depends on the caller coming back (nor
//! on the replica that started the erasure staying up).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use sqlx::PgPool;
use tokio::sync::{Notify, watch};
use uuid::Uuid;

use crate::store;

/// How the purge runs.
#[derive(Debug, Clone)]
pub struct PurgeSettings {
    /// Most messages one batch statement deletes.
    pub batch_size: i64,
    /// How often the background purger looks for unfinished erasures when
    /// nobody wakes it (a DeleteUserData that ran out of time does).
    pub interval: Duration,
}

impl Default for PurgeSettings {
    fn default() -> Self {
        Self {
            batch_size: 10_000,
            interval: Duration::from_secs(30),
        }
    }
}

/// What one DeleteUserData call did, and what is left.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Erasure {
    /// Conversations this call erased (made invisible; purged with the rest).
    pub conversations_erased: i64,
    /// Messages this call purged (the background purger's are not counted).
    pub messages_deleted: i64,
    /// Batch statements this call ran.
    pub batches: i64,
    /// Erased conversations of the user still awaiting the purge.
    pub conversations_remaining: i64,
    /// Messages they still hold.
    pub messages_remaining: i64,
}

impl Erasure {
    /// Nothing stored for the user is left (tombstones hold no user data).
    pub fn complete(&self) -> bool {
        self.conversations_remaining == 0
    }
}

/// When to stop starting batches: leave time for the answer and for a batch
/// as slow as the slowest seen, and at least a fixed margin.
#[derive(Debug)]
struct Budget {
    deadline: Instant,
    slowest: Duration,
}

/// Never start a batch with less time than this left.
const MIN_MARGIN: Duration = Duration::from_millis(200);

impl Budget {
    fn new(deadline: Instant) -> Self {
        Self {
            deadline,
            slowest: Duration::ZERO,
        }
    }

    fn allows_another(&self) -> bool {
        let margin = MIN_MARGIN.max(self.slowest * 2);
        Instant::now() + margin < self.deadline
    }

    fn record(&mut self, took: Duration) {
        self.slowest = self.slowest.max(took);
    }
}

/// How a conversation's purge ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purged {
    /// The conversation row is gone with all its messages.
    Done,
    /// Time ran out, or another purger holds the conversation.
    Unfinished,
}

/// Purges one erased conversation while `keep_going` says so; returns how it
/// ended, and adds the messages deleted and batches run to `erasure`.
async fn purge_conversation(
    pool: &PgPool,
    conversation_id: Uuid,
    batch_size: i64,
    erasure: &mut Erasure,
    mut keep_going: impl FnMut(Option<Duration>) -> bool,
) -> Result<Purged, sqlx::Error> {
    let mut after = 0_i64;
    loop {
        if !keep_going(None) {
            return Ok(Purged::Unfinished);
        }
        let started = Instant::now();
        let batch = store::erasure::purge_batch(pool, conversation_id, after, batch_size).await?;
        keep_going(Some(started.elapsed()));
        erasure.batches += 1;
        erasure.messages_deleted += batch.deleted;
        if !batch.claimed {
            return Ok(Purged::Unfinished);
        }
        match batch.last_seq {
            Some(last) if batch.deleted > 0 => after = last,
            // Nothing left after `after`: the row may go.
            _ => {
                return Ok(
                    if store::erasure::delete_purged(pool, conversation_id, after).await? {
                        Purged::Done
                    } else {
                        Purged::Unfinished
                    },
                );
            }
        }
    }
}

/// DeleteUserData: tombstones everything of `user_id` (at once), then purges
/// the user's erased conversations until `deadline` draws near.
pub async fn erase_user(
    pool: &PgPool,
    user_id: &str,
    deadline: Instant,
    settings: &PurgeSettings,
) -> Result<Erasure, sqlx::Error> {
    let mut erasure = Erasure {
        conversations_erased: store::erasure::begin(pool, user_id, maitre_runtime::db::now())
            .await?,
        ..Erasure::default()
    };
    let mut budget = Budget::new(deadline);
    // Includes conversations of an earlier, unfinished erasure of this user.
    for id in store::erasure::pending_for_user(pool, user_id).await? {
        if !budget.allows_another() {
            break;
        }
        purge_conversation(pool, id, settings.batch_size, &mut erasure, |took| {
            if let Some(took) = took {
                budget.record(took);
            }
            budget.allows_another()
        })
        .await?;
    }
    let (conversations, messages) = store::erasure::progress(pool, user_id).await?;
    erasure.conversations_remaining = conversations;
    erasure.messages_remaining = messages;
    Ok(erasure)
}

/// When the background purger first looks (unless woken or its interval is
/// shorter).
const FIRST_SWEEP_AFTER: Duration = Duration::from_secs(1);

/// Conversations the background purger takes per look.
const PURGER_PAGE: i64 = 100;

/// The background purger: finishes erased-but-unpurged conversations, of any
/// user, every `interval` or when woken, until `stopping` turns true (it
/// stops between batches, so shutdown waits for one batch at most).
#[derive(Debug, Clone)]
pub struct Purger {
    pool: PgPool,
    settings: PurgeSettings,
    wake: Arc<Notify>,
}

impl Purger {
    pub fn new(pool: PgPool, settings: PurgeSettings) -> Self {
        Self {
            pool,
            settings,
            wake: Arc::new(Notify::new()),
        }
    }

    /// Wakes the purger now (DeleteUserData ran out of time).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    pub async fn run(self, mut stopping: watch::Receiver<bool>) {
        tracing::debug!(interval = ?self.settings.interval, "purger started");
        // The first sweep finishes what a previous process left: nothing
        // that cannot wait a moment for the server and its readiness check
        // to come up first.
        let mut wait = self.settings.interval.min(FIRST_SWEEP_AFTER);
        loop {
            tokio::select! {
                _ = stopping.wait_for(|s| *s) => break,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
            wait = self.settings.interval;
            match self.sweep(&stopping).await {
                Ok(purged) if purged.messages_deleted > 0 || purged.batches > 0 => {
                    tracing::info!(
                        messages_deleted = purged.messages_deleted,
                        batches = purged.batches,
                        conversations_deleted = purged.conversations_erased,
                        "purged erased conversations"
                    );
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "purge failed; retrying later"),
            }
        }
        tracing::debug!("purger stopped");
    }

    /// Purges every pending conversation it can claim. In the returned
    /// tally, `conversations_erased` counts the conversation rows removed.
    async fn sweep(&self, stopping: &watch::Receiver<bool>) -> Result<Erasure, sqlx::Error> {
        let mut tally = Erasure::default();
        let mut skipped = std::collections::HashSet::new();
        loop {
            let pending = store::erasure::pending(&self.pool, PURGER_PAGE + skipped.len() as i64)
                .await?
                .into_iter()
                .filter(|id| !skipped.contains(id))
                .collect::<Vec<_>>();
            if pending.is_empty() {
                return Ok(tally);
            }
            for id in pending {
                let outcome = purge_conversation(
                    &self.pool,
                    id,
                    self.settings.batch_size,
                    &mut tally,
                    |_| !*stopping.borrow(),
                )
                .await?;
                match outcome {
                    Purged::Done => tally.conversations_erased += 1,
                    // Another purger holds it: its turn; ours comes next sweep.
                    Purged::Unfinished => {
                        skipped.insert(id);
                    }
                }
                if *stopping.borrow() {
                    return Ok(tally);
                }
            }
        }
    }
}

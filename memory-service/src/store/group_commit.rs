//! Group commit for StoreMessage. Calls queue up for a few writer tasks;
//! a writer takes every call queued when it gets to them (never waiting for
//! more) and writes them as one statement,
//! [`super::message_batch::STORE_MESSAGES`]. Under load one plan and one
//! commit then serve many calls; PostgreSQL's CPU per message is what bounds
//! throughput on a small machine. A lone call is written at once with the
//! one-message statement, in a task of its own.
//!
//! A conversation is in one batch or one lone write at a time. Its calls
//! in flight together have no promised order (they never had: they raced
//! for the row lock); a client that waits for each answer gets its order.
//! A batch's every row-lock wait ends after `lock_wait`
//! (`MEMORY_STORE_LOCK_WAIT`, 50 ms), and a writer waits for a lone call no
//! longer: a conversation held up by a lock holds up its own calls, and a
//! writer for at most that wait.
//!
//! Each call still gets its own answer: the batch statement answers per
//! message, and if it fails as a whole before COMMIT (a lock wait ran out, a
//! unique-key race with another batch, a value PostgreSQL refuses) nothing
//! of it was written and every call is written again on its own, so an
//! error reaches only the call it belongs to. If COMMIT itself fails, the
//! outcome is unknown and every call of the batch is told so (UNAVAILABLE;
//! a retry with its request_id is safe).

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::Arc,
    time::Duration,
};

use chrono::{DateTime, Utc};
use futures::future::join_all;
use maitre_runtime::{otel::Recorder, rpc::CallContext};
use prometheus_client::metrics::{
    counter::Counter,
    gauge::Gauge,
    histogram::{Histogram, exponential_buckets},
};
use sqlx::{AssertSqlSafe, PgPool, SqlSafeStr, SqlStr};
use tokio::sync::{Mutex, mpsc, oneshot};
use tracing::Instrument;
use uuid::Uuid;

use super::{
    message_batch::{self, BatchMessage},
    messages::{self, KeyScope, StoreOutcome},
};
use crate::domain::NewMessage;

/// What the writers report (registered by the service's metrics module).
#[derive(Debug, Clone)]
pub struct GroupCommitMetrics {
    /// Calls waiting for a writer.
    pub queued: Gauge,
    /// Messages per statement written.
    pub batch_size: Histogram,
    /// Batch statements that failed as a whole and were written again one
    /// message at a time.
    pub split: Counter,
}

impl Default for GroupCommitMetrics {
    fn default() -> Self {
        Self {
            queued: Gauge::default(),
            // 1, 2, 4 … 512 (larger batches count in +Inf only).
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
            split: Counter::default(),
        }
    }
}

/// How StoreMessage writes: see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupCommit {
    /// Writer tasks, i.e. batch statements in flight at once; 0 writes each
    /// call on its own, in the call's task.
    pub writers: usize,
    /// Most messages in one statement.
    pub max_batch: usize,
    /// The label cap of every write (`MEMORY_MAX_DISTINCT_LABELS`).
    pub max_distinct_labels: u32,
    /// How long a batch waits for each row lock before it is split, and a
    /// writer for a lone call before leaving it to its own task.
    pub lock_wait: Duration,
}

/// Writes messages, grouping concurrent calls (see the module docs).
#[derive(Debug, Clone)]
pub struct MessageWriter {
    pool: PgPool,
    settings: GroupCommit,
    metrics: GroupCommitMetrics,
    /// `None` when `settings.writers` is 0.
    queue: Option<mpsc::Sender<Pending>>,
}

/// One call waiting for a writer, and where its answer goes.
struct Pending {
    call: Call,
    reply: Reply,
}

/// One call: what to write and for whom.
struct Call {
    message_id: Uuid,
    message: Arc<NewMessage>,
    caller: String,
    fingerprint: [u8; 32],
    now: DateTime<Utc>,
    /// The call's context, only when its spans are recorded: the writer
    /// records its statements under the call.
    context: Option<CallContext>,
    /// The call's log span, so the writer's log lines name the call.
    span: tracing::Span,
}

impl MessageWriter {
    /// Starts `settings.writers` writer tasks; they end once every clone of
    /// the writer is dropped.
    pub fn spawn(pool: PgPool, settings: GroupCommit, metrics: GroupCommitMetrics) -> Self {
        let queue = (settings.writers > 0).then(|| {
            // Bounded only for form: a call in the channel is an RPC in
            // flight, which the server's concurrency limit already bounds.
            let (sender, receiver) = mpsc::channel(settings.max_batch.max(1) * settings.writers);
            let writers = Arc::new(Writers {
                pool: pool.clone(),
                begin: begin_batch(settings.lock_wait),
                queue: Mutex::new(receiver),
                owned: std::sync::Mutex::new(HashMap::new()),
                settings: GroupCommit {
                    max_batch: settings.max_batch.max(1),
                    ..settings
                },
                metrics: metrics.clone(),
            });
            for id in 0..settings.writers {
                tokio::spawn(write(writers.clone(), id));
            }
            sender
        });
        Self {
            pool,
            settings,
            metrics,
            queue,
        }
    }

    /// Stores `message` (see [`messages::store`]), in a batch with whatever
    /// other calls are waiting. If the caller goes away before a writer gets
    /// to the call, nothing is written; once its statement is sent, the call
    /// may take effect whether or not anyone waits for the answer.
    pub async fn store(
        &self,
        message_id: Uuid,
        message: Arc<NewMessage>,
        key: KeyScope<'_>,
        now: DateTime<Utc>,
    ) -> Result<StoreOutcome, sqlx::Error> {
        let Some(queue) = &self.queue else {
            return messages::store(
                &self.pool,
                message_id,
                &message,
                key,
                now,
                self.settings.max_distinct_labels,
            )
            .await;
        };
        let fingerprint = <[u8; 32]>::try_from(key.fingerprint)
            .map_err(|_| sqlx::Error::Protocol("a request fingerprint is 32 bytes".into()))?;
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            call: Call {
                message_id,
                message,
                caller: key.caller.to_owned(),
                fingerprint,
                now,
                context: Recorder::current().and_then(|_| CallContext::current()),
                span: tracing::Span::current(),
            },
            reply,
        };
        // Counted while queued; a send that fails or is cancelled (the
        // caller gone while the channel was full) uncounts it.
        let mut unsent = Queued::count(&self.metrics.queued);
        if queue.send(pending).await.is_err() {
            return Err(sqlx::Error::PoolClosed);
        }
        unsent.sent();
        // The writer never drops a call it took without answering, short of
        // a panic.
        answer.await.unwrap_or(Err(sqlx::Error::WorkerCrashed))
    }
}

/// One call counted in the `queued` gauge from before its send: uncounted
/// when dropped unless [`Queued::sent`] (then the writers uncount it).
struct Queued<'a> {
    gauge: &'a Gauge,
    sent: bool,
}

impl<'a> Queued<'a> {
    fn count(gauge: &'a Gauge) -> Self {
        gauge.inc();
        Self { gauge, sent: false }
    }

    fn sent(&mut self) {
        self.sent = true;
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if !self.sent {
            self.gauge.dec();
        }
    }
}

/// What the writers share: the queue, and who is writing which
/// conversation now, with the calls of that conversation drawn meanwhile
/// parked behind it, in order. A conversation has one writer at a time.
struct Writers {
    pool: PgPool,
    /// How a batch's transaction begins: with its lock timeout, in the same
    /// round trip ([`begin_batch`]).
    begin: SqlStr,
    queue: Mutex<mpsc::Receiver<Pending>>,
    owned: std::sync::Mutex<HashMap<Uuid, Owner>>,
    settings: GroupCommit,
    metrics: GroupCommitMetrics,
}

/// Who writes a conversation now, and its calls parked behind.
struct Owner {
    by: Holder,
    parked: VecDeque<Pending>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holder {
    /// Writer task `n`: the conversation is in its batch or its `waiting`.
    Writer(usize),
    /// A task of the conversation's own, writing its calls one at a time
    /// ([`Writers::write_alone`]): a lone call, or the calls of a batch that
    /// was split. A writer never waits for one call.
    Alone,
}

/// A writer task: takes what has queued, writes it, answers, again.
async fn write(writers: Arc<Writers>, id: usize) {
    // Calls this writer holds for a later batch (a second message of a
    // conversation already in the batch, say), oldest first.
    let mut waiting = VecDeque::new();
    loop {
        if waiting.is_empty() {
            let mut queue = writers.queue.lock().await;
            let Some(first) = queue.recv().await else {
                return;
            };
            waiting.push_back(first);
            writers.top_up(&mut queue, &mut waiting);
        } else if let Ok(mut queue) = writers.queue.try_lock() {
            writers.top_up(&mut queue, &mut waiting);
        }
        let batch = writers.take_batch(id, &mut waiting);
        if batch.is_empty() {
            continue;
        }
        writers.metrics.batch_size.observe(batch.len() as f64);
        if batch.len() == 1 {
            // Alone: the one-message statement, in a task of the
            // conversation's own. The writer waits for it as long as a batch
            // would wait for a lock, then leaves it be (a row lock held
            // elsewhere): a held-up conversation never holds up a writer.
            let done = writers.hand_over(batch, &mut waiting);
            let _ = tokio::time::timeout(writers.settings.lock_wait, done).await;
            continue;
        }
        let conversations: Vec<Uuid> = batch
            .iter()
            .map(|p| p.call.message.conversation_id)
            .collect();
        let (calls, replies): (Vec<Call>, Vec<Reply>) =
            batch.into_iter().map(|p| (p.call, p.reply)).unzip();
        let written = write_together(
            &writers.pool,
            &writers.begin,
            &calls,
            writers.settings.max_distinct_labels,
        )
        .await;
        match written {
            Ok(rows) => {
                answer_all(&writers.pool, calls, replies, rows).await;
                let mut owned = writers.lock_owned();
                settle(&mut owned, id, &conversations, &mut waiting);
            }
            // COMMIT was sent and failed: the batch may have been written,
            // so writing it again could double it. Each call learns that the
            // database failed (UNAVAILABLE); a retry with its request_id is
            // safe either way.
            Err(Failed::AtCommit(error)) => {
                tracing::error!(%error, batch = calls.len(), "a group commit's COMMIT failed");
                for (call, reply) in calls.into_iter().zip(replies) {
                    let answer = Err(sqlx::Error::Io(std::io::Error::other(format!(
                        "COMMIT of a group commit failed: {error}"
                    ))));
                    call.answer(reply, answer);
                }
                let mut owned = writers.lock_owned();
                settle(&mut owned, id, &conversations, &mut waiting);
            }
            Err(Failed::BeforeCommit(error)) => {
                writers.metrics.split.inc();
                tracing::warn!(
                    %error,
                    batch = calls.len(),
                    "a group commit failed as a whole; writing its calls one by one"
                );
                let batch = calls
                    .into_iter()
                    .zip(replies)
                    .map(|(call, reply)| Pending { call, reply })
                    .collect();
                // The writer goes on at once.
                drop(writers.hand_over(batch, &mut waiting));
            }
        }
    }
}

impl Writers {
    fn lock_owned(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Owner>> {
        self.owned.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves what is queued now into `waiting`, up to a batch.
    fn top_up(&self, queue: &mut mpsc::Receiver<Pending>, waiting: &mut VecDeque<Pending>) {
        while waiting.len() < self.settings.max_batch {
            match queue.try_recv() {
                Ok(pending) => waiting.push_back(pending),
                Err(_) => break,
            }
        }
    }

    /// What writer `id`'s next statement writes of `waiting`, in order: at
    /// most one message per conversation and per request key, at most
    /// `max_batch`, none of a conversation someone else is writing (those
    /// are parked behind it). The rest stay in `waiting`, in their order.
    /// Calls whose caller has gone are dropped unwritten.
    fn take_batch(&self, id: usize, waiting: &mut VecDeque<Pending>) -> Vec<Pending> {
        let mut owned = self.lock_owned();
        let mut batch: Vec<Pending> = Vec::new();
        let mut held = HashSet::new();
        let mut keys = HashSet::new();
        let mut kept = VecDeque::new();
        let mut dropped = Vec::new();
        for pending in waiting.drain(..) {
            let conversation = pending.call.message.conversation_id;
            if pending.reply.is_closed() {
                self.metrics.queued.dec();
                dropped.push(conversation);
                continue;
            }
            if let Some(owner) = owned.get_mut(&conversation)
                && owner.by != Holder::Writer(id)
            {
                // Calls whose callers have gone go now, not when reached:
                // behind a long-held conversation they would pile up.
                let before = owner.parked.len();
                owner.parked.retain(|p| !p.reply.is_closed());
                let gone = before - owner.parked.len();
                self.metrics
                    .queued
                    .dec_by(i64::try_from(gone).unwrap_or(i64::MAX));
                owner.parked.push_back(pending);
                continue;
            }
            let message = &pending.call.message;
            let key = message
                .request_id
                .as_deref()
                .map(|r| (message.user_id.clone(), r.to_owned()));
            let free =
                !held.contains(&conversation) && key.as_ref().is_none_or(|k| !keys.contains(k));
            // Held either way, here and from the others: a later call of
            // this conversation must not overtake this one.
            held.insert(conversation);
            owned.entry(conversation).or_insert(Owner {
                by: Holder::Writer(id),
                parked: VecDeque::new(),
            });
            if batch.len() < self.settings.max_batch && free {
                keys.extend(key);
                self.metrics.queued.dec();
                batch.push(pending);
            } else {
                kept.push_back(pending);
            }
        }
        *waiting = kept;
        // A dropped call may have been this writer's last of a conversation
        // it holds: let go of it, or take up what is parked behind it.
        dropped.retain(|c| !held.contains(c));
        settle(&mut owned, id, &dropped, waiting);
        batch
    }

    /// Gives `batch`'s calls (taken by a writer, so it holds their
    /// conversations) each to a task of its conversation's own, with this
    /// writer's later calls of those conversations parked behind them, in
    /// order. Resolves when all of `batch`'s own calls are answered.
    fn hand_over(
        self: &Arc<Self>,
        batch: Vec<Pending>,
        waiting: &mut VecDeque<Pending>,
    ) -> impl Future<Output = ()> + use<> {
        let mut owned = self.lock_owned();
        let mut answered = Vec::with_capacity(batch.len());
        for pending in batch {
            let conversation = pending.call.message.conversation_id;
            let owner = owned.entry(conversation).or_insert(Owner {
                by: Holder::Alone,
                parked: VecDeque::new(),
            });
            owner.by = Holder::Alone;
            // This writer's later calls were drawn before the parked ones.
            let mut later: VecDeque<Pending> = VecDeque::new();
            let mut rest = VecDeque::new();
            for p in waiting.drain(..) {
                if p.call.message.conversation_id == conversation {
                    later.push_back(p);
                } else {
                    rest.push_back(p);
                }
            }
            *waiting = rest;
            later.append(&mut owner.parked);
            owner.parked = later;
            let (done, answered_one) = oneshot::channel();
            answered.push(answered_one);
            tokio::spawn(self.clone().write_alone(conversation, pending, done));
        }
        async move {
            join_all(answered).await;
        }
    }

    /// Writes `first`, then the calls parked behind it, one at a time, with
    /// the one-message statement, answering each; then lets go of the
    /// conversation.
    /// `first_done` is told when `first` is answered.
    async fn write_alone(
        self: Arc<Self>,
        conversation: Uuid,
        first: Pending,
        first_done: oneshot::Sender<()>,
    ) {
        let mut first_done = Some(first_done);
        let mut next = Some(first);
        while let Some(Pending { call, reply }) = next {
            if !reply.is_closed() {
                let answer = call
                    .store_alone(&self.pool, self.settings.max_distinct_labels)
                    .await;
                call.answer(reply, answer);
            }
            if let Some(done) = first_done.take() {
                let _ = done.send(());
            }
            let mut owned = self.lock_owned();
            next = owned
                .get_mut(&conversation)
                .and_then(|owner| owner.parked.pop_front());
            if next.is_some() {
                // Taken (answered or dropped, it waits no longer).
                self.metrics.queued.dec();
            } else {
                owned.remove(&conversation);
            }
        }
    }
}

/// After writer `id` is done with `conversations`: the calls parked behind
/// it join its `waiting` (they were drawn after everything it holds), and it
/// keeps the conversations it still holds calls of.
fn settle(
    owned: &mut HashMap<Uuid, Owner>,
    id: usize,
    conversations: &[Uuid],
    waiting: &mut VecDeque<Pending>,
) {
    for conversation in conversations {
        if let Some(owner) = owned.get_mut(conversation)
            && owner.by == Holder::Writer(id)
        {
            waiting.extend(owner.parked.drain(..));
        }
    }
    for conversation in conversations {
        let ours = owned
            .get(conversation)
            .is_some_and(|owner| owner.by == Holder::Writer(id));
        let still_held = waiting
            .iter()
            .any(|p| p.call.message.conversation_id == *conversation);
        if ours && !still_held {
            owned.remove(conversation);
        }
    }
}

/// Answers each call of a batch that was written, reading what its answer
/// row leaves out (a replayed message, who owns a refused conversation).
async fn answer_all(
    pool: &PgPool,
    calls: Vec<Call>,
    replies: Vec<Reply>,
    rows: Vec<Option<messages::StoredRow>>,
) {
    join_all(
        calls
            .into_iter()
            .zip(replies)
            .zip(rows)
            .map(|((call, reply), row)| async move {
                let answer = call
                    .in_call(messages::resolve(
                        pool,
                        row,
                        call.message_id,
                        &call.message,
                        call.key(),
                        call.now,
                    ))
                    .await;
                call.answer(reply, answer);
            }),
    )
    .await;
}

/// Writes `calls` (two or more) in one statement, in a transaction whose
/// every row-lock wait ends after `MEMORY_STORE_LOCK_WAIT` ([`begin_batch`];
/// three round trips: BEGIN with the timeout, the statement, COMMIT): a
/// conversation held up elsewhere then fails the batch, and its calls are
/// written on their own instead of the batch waiting with it.
async fn write_together(
    pool: &PgPool,
    begin: &SqlStr,
    calls: &[Call],
    max_distinct_labels: u32,
) -> Result<Vec<Option<messages::StoredRow>>, Failed> {
    let batch: Vec<BatchMessage<'_>> = calls
        .iter()
        .map(|c| BatchMessage {
            message_id: c.message_id,
            message: &c.message,
            key: c.key(),
            now: c.now,
        })
        .collect();
    let recorders: Vec<Recorder> = calls
        .iter()
        .filter_map(|c| c.context.as_ref().and_then(Recorder::of))
        .collect();
    let written = async {
        let mut tx = pool.begin_with(begin.clone()).await?;
        let rows =
            message_batch::store_batch(&mut *tx, &batch, max_distinct_labels, &recorders).await?;
        Ok((tx, rows))
    };
    // Dropped on an error, the transaction rolls back: nothing was written.
    let (tx, rows) = written.await.map_err(Failed::BeforeCommit)?;
    tx.commit().await.map_err(Failed::AtCommit)?;
    Ok(rows)
}

/// How a batch failed: before COMMIT (nothing written, write each call
/// again) or at COMMIT (the outcome is unknown).
enum Failed {
    BeforeCommit(sqlx::Error),
    AtCommit(sqlx::Error),
}

/// The statement that begins a batch's transaction: BEGIN and its
/// `lock_timeout` (for this transaction only) in one simple query, one round
/// trip. Batches never share a conversation; a wait means
/// CloseConversation, UpdateConversationState, an erasure, a request key
/// another batch or a lone call is inserting, or a lock taken by hand.
fn begin_batch(lock_wait: Duration) -> SqlStr {
    // An integer (0 would mean no timeout): nothing to escape.
    let millis = lock_wait.as_millis().max(1);
    AssertSqlSafe(format!("BEGIN; SET LOCAL lock_timeout = '{millis}ms'")).into_sql_str()
}

type Reply = oneshot::Sender<Result<StoreOutcome, sqlx::Error>>;

impl Call {
    fn key(&self) -> KeyScope<'_> {
        KeyScope {
            caller: &self.caller,
            fingerprint: &self.fingerprint,
        }
    }

    /// The one-message statement, for this call alone.
    async fn store_alone(
        &self,
        pool: &PgPool,
        max_distinct_labels: u32,
    ) -> Result<StoreOutcome, sqlx::Error> {
        self.in_call(messages::store(
            pool,
            self.message_id,
            &self.message,
            self.key(),
            self.now,
            max_distinct_labels,
        ))
        .await
    }

    /// Runs `work` as part of this call: in its log span and, when the call
    /// is recorded, its trace.
    async fn in_call<F: Future>(&self, work: F) -> F::Output {
        let work = work.instrument(self.span.clone());
        match &self.context {
            Some(context) => context.clone().scope(work).await,
            None => work.await,
        }
    }

    /// Answers the caller, after letting go of the message: the caller then
    /// takes it back without a copy. A caller gone meanwhile drops it.
    fn answer(self, reply: Reply, answer: Result<StoreOutcome, sqlx::Error>) {
        drop(self);
        let _ = reply.send(answer);
    }
}

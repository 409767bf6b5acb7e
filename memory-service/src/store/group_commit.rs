//! Group commit for StoreMessage. Calls queue up for a few writer tasks;
//! a writer takes every call queued when it gets to them (never waiting for
//! more: a lone call is written at once) and writes them as one statement,
//! [`super::message_batch::STORE_MESSAGES`]. Under load one round trip,
//! one plan and one commit then serve many calls; PostgreSQL's CPU per
//! message is what bounds throughput on a small machine.
//!
//! A conversation is in one writer's statement at a time, its calls taken in
//! the order the writers drew them: a conversation held up (a long row lock)
//! holds up one writer and its own calls, never every write. A batch waits
//! at most 50 ms for a row lock; then it is split, and its calls are written
//! on their own, so one held-up conversation delays its batch by that much.
//!
//! Each call still gets its own answer: the batch statement answers per
//! message, and if it fails as a whole (a unique-key race between two
//! batches, a deadlock with an erasure, a value PostgreSQL refuses) nothing
//! of it was written and every call is written again on its own, so an error
//! reaches only the call it belongs to.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::Arc,
};

use chrono::{DateTime, Utc};
use futures::future::join_all;
use maitre_runtime::{otel::Recorder, rpc::CallContext};
use prometheus_client::metrics::{
    counter::Counter,
    gauge::Gauge,
    histogram::{Histogram, exponential_buckets},
};
use sqlx::PgPool;
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
            // 1, 2, 4 … 512: up to the largest MEMORY_STORE_BATCH_MAX.
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
            // Bounded only for form: every queued call is an RPC in flight,
            // which the server's concurrency limit already bounds.
            let (sender, receiver) = mpsc::channel(settings.max_batch.max(1) * settings.writers);
            let writers = Arc::new(Writers {
                queue: Mutex::new(receiver),
                owned: std::sync::Mutex::new(HashMap::new()),
                settings: GroupCommit {
                    max_batch: settings.max_batch.max(1),
                    ..settings
                },
                metrics: metrics.clone(),
            });
            for id in 0..settings.writers {
                tokio::spawn(write(writers.clone(), id, pool.clone()));
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
        self.metrics.queued.inc();
        if queue.send(pending).await.is_err() {
            self.metrics.queued.dec();
            return Err(sqlx::Error::PoolClosed);
        }
        // The writer never drops a call it took without answering, short of
        // a panic.
        answer.await.unwrap_or(Err(sqlx::Error::WorkerCrashed))
    }
}

/// What the writers share: the queue, and which conversations each is
/// writing now with the calls of those conversations that other writers
/// drew meanwhile (parked there, in order). A conversation is written by
/// one writer at a time: a conversation held up (a long row lock) holds up
/// one writer and its own calls, never every writer.
struct Writers {
    queue: Mutex<mpsc::Receiver<Pending>>,
    owned: std::sync::Mutex<HashMap<Uuid, Owner>>,
    settings: GroupCommit,
    metrics: GroupCommitMetrics,
}

/// The writer writing a conversation, and its calls parked behind it.
struct Owner {
    writer: usize,
    parked: VecDeque<Pending>,
}

/// A writer task: takes what has queued, writes it, answers, again.
async fn write(writers: Arc<Writers>, id: usize, pool: PgPool) {
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
        let conversations: Vec<Uuid> = batch
            .iter()
            .map(|p| p.call.message.conversation_id)
            .collect();
        write_batch(&pool, batch, &writers).await;
        writers.release(id, &conversations, &mut waiting);
    }
}

impl Writers {
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
    /// `max_batch`, none of a conversation another writer is writing (those
    /// are parked behind it). The rest stay in `waiting`, in their order, so
    /// a conversation's calls are written in the order they were drawn.
    /// Calls whose caller has gone are dropped unwritten.
    fn take_batch(&self, id: usize, waiting: &mut VecDeque<Pending>) -> Vec<Pending> {
        let mut owned = self.owned.lock().unwrap_or_else(|e| e.into_inner());
        let mut batch: Vec<Pending> = Vec::new();
        let mut held = HashSet::new();
        let mut keys = HashSet::new();
        let mut kept = VecDeque::new();
        for pending in waiting.drain(..) {
            if pending.reply.is_closed() {
                self.metrics.queued.dec();
                continue;
            }
            let conversation = pending.call.message.conversation_id;
            if let Some(owner) = owned.get_mut(&conversation)
                && owner.writer != id
            {
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
            // Held either way, here and from the other writers: a later
            // call of this conversation must not overtake this one.
            held.insert(conversation);
            owned.entry(conversation).or_insert(Owner {
                writer: id,
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
        batch
    }

    /// After writer `id` wrote `conversations`: their parked calls join its
    /// `waiting` (they were drawn after everything it holds), and it keeps
    /// the conversations it still holds calls of.
    fn release(&self, id: usize, conversations: &[Uuid], waiting: &mut VecDeque<Pending>) {
        let mut owned = self.owned.lock().unwrap_or_else(|e| e.into_inner());
        for conversation in conversations {
            if let Some(owner) = owned.get_mut(conversation)
                && owner.writer == id
            {
                waiting.extend(owner.parked.drain(..));
            }
        }
        for conversation in conversations {
            let still_held = waiting
                .iter()
                .any(|p| p.call.message.conversation_id == *conversation);
            if !still_held {
                owned.remove(conversation);
            }
        }
    }
}

/// Writes `batch` and answers each call as soon as its own answer is known.
/// A batch that fails is split: each call is written again on its own, in
/// tasks of their own, and the writer lets go of the batch's conversations.
async fn write_batch(pool: &PgPool, mut batch: Vec<Pending>, writers: &Writers) {
    let max_distinct_labels = writers.settings.max_distinct_labels;
    if batch.len() < 2 {
        // Alone: the one-message statement, as without group commit.
        if let Some(Pending { call, reply }) = batch.pop() {
            let answer = call.store_alone(pool, max_distinct_labels).await;
            call.answer(reply, answer);
        }
        return;
    }
    let (calls, replies): (Vec<Call>, Vec<Reply>) =
        batch.into_iter().map(|p| (p.call, p.reply)).unzip();
    match write_together(pool, &calls, max_distinct_labels).await {
        Ok(rows) => {
            join_all(calls.into_iter().zip(replies).zip(rows).map(
                |((call, reply), row)| async move {
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
                },
            ))
            .await;
        }
        Err(error) => {
            writers.metrics.split.inc();
            tracing::warn!(
                %error,
                batch = calls.len(),
                "a group commit failed as a whole; writing its messages one by one"
            );
            // In a task of their own: the writer goes on to other calls,
            // and the one held up keeps only its own connection.
            for (call, reply) in calls.into_iter().zip(replies) {
                let pool = pool.clone();
                tokio::spawn(async move {
                    let answer = call.store_alone(&pool, max_distinct_labels).await;
                    call.answer(reply, answer);
                });
            }
        }
    }
}

/// Writes `calls` (two or more) in one statement, in a transaction that
/// waits at most 50 ms for any row lock ([`SET_BATCH_LOCK_TIMEOUT`]): a conversation
/// held up elsewhere then fails the batch, and its other calls are written
/// on their own instead of waiting with it.
async fn write_together(
    pool: &PgPool,
    calls: &[Call],
    max_distinct_labels: u32,
) -> Result<Vec<Option<messages::StoredRow>>, sqlx::Error> {
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
    let mut tx = pool.begin().await?;
    sqlx::query(SET_BATCH_LOCK_TIMEOUT)
        .execute(&mut *tx)
        .await?;
    let rows =
        message_batch::store_batch(&mut *tx, &batch, max_distinct_labels, &recorders).await?;
    tx.commit().await?;
    Ok(rows)
}

/// How long a batch waits for a row lock before it is split (see
/// [`write_together`]): 50 ms, for the batch's transaction only. Our own
/// writers never wait on each other's conversations; a wait means
/// CloseConversation, UpdateConversationState, an erasure, or a lock taken
/// by hand.
const SET_BATCH_LOCK_TIMEOUT: &str = "SET LOCAL lock_timeout = '50ms'";

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

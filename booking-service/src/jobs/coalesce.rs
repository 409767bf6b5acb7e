//! Coalescing the follow-up jobs' statements: the job runs that reach the
//! same statement at the same time (the burst at an event's end, where every
//! booking's job comes due at once) share one multi-row statement: one
//! plan, one set of round trips and one commit for all of them, and each
//! run still gets its own row back.
//!
//! A run hands its input to a [`Coalescer`] and awaits its answer. Flusher
//! tasks each take every input queued when they get to it (never waiting
//! for more, so a lone run is not delayed), run the batch function on them
//! and answer each run. The batch function answers one [`Answer`] per
//! input, in order: its result, or [`Answer::Alone`] when the run must use
//! the one-row statement itself (the multi-row statement failed on a row,
//! or waited too long for one), so an error or a wait reaches only the run
//! it belongs to, in that run's own task.
//!
//! A run whose caller is gone (its job cancelled at shutdown) before its
//! batch is taken is left out of it. Once taken, it is written: exactly as
//! a run that dies after its statement, which the jobs already survive (the
//! claim's lease, the sweep).

use std::{future::Future, pin::Pin, sync::Arc};

use maitre_runtime::otel::Recorder;
use tokio::sync::{Mutex, mpsc, oneshot};

/// The batch function's future.
pub type BatchFuture<O> = Pin<Box<dyn Future<Output = Vec<Answer<O>>> + Send>>;

/// A batch's answer to one run.
#[derive(Debug)]
pub enum Answer<O> {
    /// The statement's result for this run.
    Done(Result<O, sqlx::Error>),
    /// Not done: the run does its work with the one-row statement.
    Alone,
}

/// What one flush gets: the inputs in the order they came, and the recorded
/// traces among their runs (each gets a client span for the statement).
pub struct Batch<I> {
    pub inputs: Vec<I>,
    pub recorders: Vec<Recorder>,
}

struct Pending<I, O> {
    input: I,
    recorder: Option<Recorder>,
    reply: oneshot::Sender<Answer<O>>,
}

/// Where a batch's size is reported (a histogram per statement).
pub type SizeObserver = Arc<dyn Fn(usize) + Send + Sync>;

/// Concurrent calls of one statement, coalesced. Cheap to share (`Arc`);
/// the flushers stop when the last handle is dropped.
pub struct Coalescer<I, O> {
    queue: mpsc::UnboundedSender<Pending<I, O>>,
}

impl<I: Send + 'static, O: Send + 'static> Coalescer<I, O> {
    /// `flushers` tasks (at least one) run `run` on up to `max_batch`
    /// inputs each; `observe` hears each batch's size.
    pub fn spawn<F>(flushers: usize, max_batch: usize, observe: SizeObserver, run: F) -> Self
    where
        F: Fn(Batch<I>) -> BatchFuture<O> + Send + Sync + 'static,
    {
        let (queue, receiver) = mpsc::unbounded_channel();
        let receiver = Arc::new(Mutex::new(receiver));
        let run = Arc::new(run);
        for _ in 0..flushers.max(1) {
            tokio::spawn(flush(
                receiver.clone(),
                max_batch.max(1),
                observe.clone(),
                run.clone(),
            ));
        }
        Self { queue }
    }

    /// Runs `input` in the next batch and returns its own answer.
    pub async fn call(&self, input: I) -> Answer<O> {
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            input,
            recorder: Recorder::current(),
            reply,
        };
        if self.queue.send(pending).is_err() {
            // No flusher left (they stop only with the last handle): the
            // run can still use the one-row statement.
            return Answer::Alone;
        }
        answer
            .await
            .unwrap_or_else(|_| Answer::Done(Err(stopped())))
    }
}

fn stopped() -> sqlx::Error {
    sqlx::Error::Protocol(
        "the statement's coalescer stopped (shutdown or a panic in its batch)".into(),
    )
}

async fn flush<I, O, F>(
    receiver: Arc<Mutex<mpsc::UnboundedReceiver<Pending<I, O>>>>,
    max_batch: usize,
    observe: SizeObserver,
    run: Arc<F>,
) where
    I: Send + 'static,
    O: Send + 'static,
    F: Fn(Batch<I>) -> BatchFuture<O> + Send + Sync + 'static,
{
    loop {
        let taken = {
            let mut receiver = receiver.lock().await;
            let Some(first) = receiver.recv().await else {
                return;
            };
            let mut taken = vec![first];
            while taken.len() < max_batch {
                match receiver.try_recv() {
                    Ok(next) => taken.push(next),
                    Err(_) => break,
                }
            }
            taken.retain(|pending| !pending.reply.is_closed());
            taken
        };
        if taken.is_empty() {
            continue;
        }
        observe(taken.len());
        let mut inputs = Vec::with_capacity(taken.len());
        let mut recorders = Vec::new();
        let mut replies = Vec::with_capacity(taken.len());
        for pending in taken {
            inputs.push(pending.input);
            recorders.extend(pending.recorder);
            replies.push(pending.reply);
        }
        // In a task of its own: a panic in one batch fails its runs (they
        // get an error, as from a lost connection), not the flusher.
        let results = tokio::spawn(run(Batch { inputs, recorders })).await;
        match results {
            Ok(results) if results.len() == replies.len() => {
                for (reply, result) in replies.into_iter().zip(results) {
                    // The run is gone (cancelled): nothing to tell it.
                    let _ = reply.send(result);
                }
            }
            Ok(results) => {
                tracing::error!(
                    inputs = replies.len(),
                    answers = results.len(),
                    "a batch answered the wrong number of results; failing its runs"
                );
                for reply in replies {
                    let _ = reply.send(Answer::Done(Err(stopped())));
                }
            }
            Err(error) => {
                tracing::error!(%error, "a batch panicked; failing its runs");
                for reply in replies {
                    let _ = reply.send(Answer::Done(Err(stopped())));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn doubling(sizes: Arc<std::sync::Mutex<Vec<usize>>>) -> Coalescer<u32, u32> {
        let observe: SizeObserver = Arc::new(move |n| sizes.lock().unwrap().push(n));
        Coalescer::spawn(1, 8, observe, |batch: Batch<u32>| {
            Box::pin(async move {
                tokio::task::yield_now().await;
                batch
                    .inputs
                    .into_iter()
                    .map(|i| match i {
                        13 => Answer::Done(Err(sqlx::Error::RowNotFound)),
                        7 => Answer::Alone,
                        i => Answer::Done(Ok(i * 2)),
                    })
                    .collect()
            })
        })
    }

    #[tokio::test]
    async fn each_call_gets_its_own_answer_and_concurrent_calls_share_batches() {
        let sizes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let coalescer = Arc::new(doubling(sizes.clone()));
        let calls = (0..40u32).map(|i| {
            let coalescer = coalescer.clone();
            tokio::spawn(async move { (i, coalescer.call(i).await) })
        });
        for call in futures::future::join_all(calls).await {
            let (i, result) = call.unwrap();
            match (i, result) {
                (13, Answer::Done(Err(sqlx::Error::RowNotFound))) | (7, Answer::Alone) => {}
                (i, Answer::Done(Ok(doubled))) => assert_eq!(doubled, i * 2),
                (i, other) => panic!("{i}: {other:?}"),
            }
        }
        let sizes = sizes.lock().unwrap().clone();
        assert_eq!(sizes.iter().sum::<usize>(), 40);
        assert!(sizes.iter().all(|&n| n <= 8), "{sizes:?}");
        assert!(
            sizes.len() < 40,
            "concurrent calls never shared a batch: {sizes:?}"
        );
    }

    #[tokio::test]
    async fn a_panicking_batch_fails_only_its_own_calls() {
        let runs = Arc::new(AtomicUsize::new(0));
        let observe: SizeObserver = Arc::new(|_| {});
        let coalescer = Coalescer::spawn(1, 8, observe, {
            let runs = runs.clone();
            move |batch: Batch<u32>| {
                let first = runs.fetch_add(1, Ordering::SeqCst) == 0;
                Box::pin(async move {
                    assert!(!first, "the first batch panics");
                    batch
                        .inputs
                        .into_iter()
                        .map(|i| Answer::Done(Ok(i)))
                        .collect()
                })
            }
        });
        assert!(matches!(coalescer.call(1).await, Answer::Done(Err(_))));
        assert!(matches!(coalescer.call(2).await, Answer::Done(Ok(2))));
    }
}

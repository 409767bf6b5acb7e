//! Running the two apalis workers (plan, deliver) and housekeeping, each
//! worker supervised: a worker stops on a database error (or on a row it
//! cannot read), so it runs in its own task (a panic is a stop too), the
//! poison guard clears unreadable rows out of its way (`poison`), and it is
//! restarted with a growing delay under a new name (apalis refuses a name
//! still registered), until shutdown. On shutdown, running jobs finish; jobs
//! fetched but not started go back to the queue (apalis returns its buffer;
//! `store::jobs::release_unstarted` those of a fetch cut by the stop).

use std::{future::Future, time::Duration};

use apalis::prelude::*;
use apalis_postgres::{Config, PostgresStorage};
use tokio::sync::watch;

use super::{
    DELIVER_QUEUE, DeliverFollowUp, JobContext, PLAN_QUEUE, PlanFollowUp, deliver, plan, poison,
};
use crate::store::{self, jobs::Enqueued};

/// How the workers fetch and recover jobs.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Jobs run at once, per queue.
    pub concurrency: usize,
    /// Polling interval besides LISTEN/NOTIFY (which is silent for jobs
    /// scheduled in the future).
    pub poll_interval: Duration,
    /// Heartbeat of each worker; a worker silent for `heartbeat_interval ×
    /// missed_heartbeats` is dead and its jobs are re-enqueued.
    pub heartbeat_interval: Duration,
    pub missed_heartbeats: usize,
    /// Dead job rows (done, killed, failed for good) and worker
    /// registrations older than this are deleted.
    pub job_retention: Duration,
    /// How often housekeeping (pruning, the stranded-work sweep) runs.
    pub prune_interval: Duration,
    /// Work overdue by this much with no live job is enqueued again.
    pub sweep_grace: Duration,
}

impl WorkerSettings {
    fn config(&self, queue: &str) -> Config {
        Config::default()
            .queue(queue)
            .batch_size(self.concurrency.max(1))
            .heartbeat_interval(self.heartbeat_interval)
            .missed_heartbeats(self.missed_heartbeats)
    }

    /// Polling, and a fetch whenever the queue is poked (`wakeups`).
    fn strategy(&self, ctx: &JobContext, queue: &'static str) -> Strategy {
        Strategy::new()
            .interval(self.poll_interval)
            .apply(StreamStrategy::new(ctx.wakeups.stream(queue)))
    }
}

/// Runs both workers and the pruner until `stop` turns true; the wake-ups
/// from other replicas are listened for on a connection of `listener`
/// (straight to PostgreSQL: LISTEN needs a session of its own).
pub async fn run(
    ctx: JobContext,
    settings: WorkerSettings,
    listener: sqlx::PgPool,
    stop: watch::Receiver<bool>,
) {
    let plan_guard = {
        let ctx = ctx.clone();
        move |stopped: String| {
            let ctx = ctx.clone();
            async move {
                poison::guard::<PlanFollowUp>(&ctx.pool, PLAN_QUEUE, &stopped, &ctx.metrics).await
            }
        }
    };
    let deliver_guard = {
        let ctx = ctx.clone();
        move |stopped: String| {
            let ctx = ctx.clone();
            async move {
                poison::guard::<DeliverFollowUp>(&ctx.pool, DELIVER_QUEUE, &stopped, &ctx.metrics)
                    .await
            }
        }
    };
    let plan_worker = supervise(PLAN_QUEUE, ctx.pool.clone(), stop.clone(), plan_guard, {
        let (ctx, settings) = (ctx.clone(), settings.clone());
        move |name, signal| {
            let backend = PostgresStorage::<PlanFollowUp>::new(&ctx.pool)
                .with_config(settings.config(PLAN_QUEUE))
                .poll_with_strategy(settings.strategy(&ctx, PLAN_QUEUE));
            WorkerBuilder::new(name)
                .backend(backend)
                .data(ctx.clone())
                .concurrency(settings.concurrency)
                .build(plan::handle)
                .run_until(signal)
        }
    });
    let deliver_worker = supervise(
        DELIVER_QUEUE,
        ctx.pool.clone(),
        stop.clone(),
        deliver_guard,
        {
            let (ctx, settings) = (ctx.clone(), settings.clone());
            move |name, signal| {
                let backend = PostgresStorage::<DeliverFollowUp>::new(&ctx.pool)
                    .with_config(settings.config(DELIVER_QUEUE))
                    .poll_with_strategy(settings.strategy(&ctx, DELIVER_QUEUE));
                WorkerBuilder::new(name)
                    .backend(backend)
                    .data(ctx.clone())
                    .concurrency(settings.concurrency)
                    .build(deliver::handle)
                    .run_until(signal)
            }
        },
    );
    let listening = ctx.wakeups.clone().listen_until(listener, stop.clone());
    let timers = ctx
        .wakeups
        .clone()
        .arm_upcoming_until(ctx.pool.clone(), stop.clone());
    let housekeeping = housekeeping(ctx.clone(), settings.clone(), stop);
    tokio::join!(plan_worker, deliver_worker, housekeeping, listening, timers);
}

/// A worker run this long counts as healthy: the next failure starts the
/// restart delays over.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// Restarts `run_worker` after each failure, waiting 0.5 s, 1 s, 2 s, ...
/// (at most 30 s), until `stop`. Each run is a task of its own, so that a
/// panic inside apalis (it unwraps what it reads) is a failure like any
/// other; after each failure `guard` gets the stopped worker's name and
/// clears unreadable rows from the queue before the restart.
async fn supervise<F, Fut, E, G, GFut>(
    queue: &'static str,
    pool: sqlx::PgPool,
    stop: watch::Receiver<bool>,
    guard: G,
    run_worker: F,
) where
    F: Fn(
        String,
        std::pin::Pin<Box<dyn Future<Output = Result<(), std::io::Error>> + Send>>,
    ) -> Fut,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
    G: Fn(String) -> GFut,
    GFut: Future<Output = Result<usize, sqlx::Error>>,
{
    // `restarts` names each run uniquely; `failures_in_a_row` sets the
    // delay and starts over once a run has stayed up for a while, so brief
    // database blips hours apart do not add up to the longest delay.
    let mut restarts: u32 = 0;
    let mut failures_in_a_row: u32 = 0;
    loop {
        if *stop.borrow() {
            return;
        }
        let started = std::time::Instant::now();
        let name = format!("{queue}@{}#{restarts}", instance_name());
        let mut signal_rx = stop.clone();
        let signal = Box::pin(async move {
            let _ = signal_rx.wait_for(|stopping| *stopping).await;
            Ok::<(), std::io::Error>(())
        });
        tracing::info!(worker = %name, "worker starting");
        let error = match tokio::spawn(run_worker(name.clone(), signal)).await {
            Ok(Ok(())) => {
                match store::jobs::release_unstarted(&pool, queue, &name).await {
                    Ok(0) => {}
                    Ok(released) => {
                        tracing::info!(worker = %name, released, "jobs fetched at the stop put back in the queue")
                    }
                    Err(error) => {
                        tracing::warn!(worker = %name, %error, "could not put back the jobs fetched at the stop; the heartbeat timeout will")
                    }
                }
                tracing::info!(worker = %name, "worker stopped");
                return;
            }
            Ok(Err(error)) => error.to_string(),
            Err(join_error) => format!("worker task ended: {join_error}"),
        };
        restarts += 1;
        failures_in_a_row = if started.elapsed() >= HEALTHY_RUN {
            1
        } else {
            failures_in_a_row + 1
        };
        let delay = Duration::from_millis(250 * 2u64.pow(failures_in_a_row.min(7)))
            .min(Duration::from_secs(30));
        tracing::warn!(worker = %name, %error, ?delay, "worker stopped on an error; restarting");
        match guard(name.clone()).await {
            Ok(0) => {}
            Ok(killed) => {
                tracing::warn!(worker = %name, killed, "unreadable job rows dead-lettered; restarting at once");
                // The cause is gone: no reason to wait.
                failures_in_a_row = 0;
                continue;
            }
            Err(error) => {
                tracing::warn!(worker = %name, %error, "the poison guard could not run; restarting anyway")
            }
        }
        let mut stop_rx = stop.clone();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop_rx.wait_for(|stopping| *stopping) => return,
        }
    }
}

/// This process's name among workers: host (the pod's name on Kubernetes)
/// plus a random part, since every container's main process is pid 1.
fn instance_name() -> String {
    static INSTANCE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    INSTANCE
        .get_or_init(|| {
            let host = std::env::var("HOSTNAME")
                .ok()
                .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "localhost".into());
            let random = uuid::Uuid::now_v7().simple().to_string();
            format!("{host}-{}", &random[random.len() - 8..])
        })
        .clone()
}

/// Every `prune_interval`: delete dead job rows and worker registrations
/// past retention, and enqueue again any planning or delivery whose job died
/// (`store::sweeps`).
async fn housekeeping(ctx: JobContext, settings: WorkerSettings, mut stop: watch::Receiver<bool>) {
    loop {
        match store::jobs::prune(&ctx.pool, settings.job_retention).await {
            Ok(pruned) => {
                ctx.metrics.pruned("jobs", pruned.jobs);
                ctx.metrics.pruned("workers", pruned.workers);
                if pruned != store::jobs::Pruned::default() {
                    tracing::info!(
                        jobs = pruned.jobs,
                        workers = pruned.workers,
                        "pruned dead job rows and worker registrations"
                    );
                }
            }
            Err(error) => tracing::warn!(%error, "pruning failed; will retry"),
        }
        if let Err(error) = sweep(&ctx, &settings, &stop).await {
            tracing::warn!(%error, "sweeping stranded follow-ups failed; will retry");
        }
        tokio::select! {
            _ = tokio::time::sleep(settings.prune_interval) => {}
            _ = stop.wait_for(|stopping| *stopping) => return,
        }
    }
}

/// One sweep: every stranded delivery and planning, page by page (each page
/// one short statement, each re-enqueue its own short transaction), until
/// none is left or shutdown begins. Returns how many were enqueued again.
pub async fn sweep(
    ctx: &JobContext,
    settings: &WorkerSettings,
    stop: &watch::Receiver<bool>,
) -> Result<u64, sqlx::Error> {
    let grace = settings.sweep_grace.as_secs_f64();
    let mut deliveries = 0;
    let mut after = (
        chrono::DateTime::<chrono::Utc>::UNIX_EPOCH,
        uuid::Uuid::nil(),
    );
    loop {
        let page = store::sweeps::stranded_deliveries(&ctx.pool, grace, after).await?;
        for &(follow_up_id, attempts, _) in &page {
            let attempt = u32::try_from(attempts).unwrap_or(0) + 1;
            let job = DeliverFollowUp {
                follow_up_id,
                attempt,
                trace_parent: None,
            };
            let mut tx = ctx.pool.begin().await?;
            let enqueued =
                store::jobs::push_deliver(&mut tx, &job, maitre_runtime::db::now()).await?;
            tx.commit().await?;
            if enqueued == Enqueued::New {
                deliveries += 1;
                tracing::warn!(%follow_up_id, attempt, "delivery had no live job; enqueued again");
            }
        }
        match page.last() {
            Some(&(id, _, scheduled_at)) if page.len() as i64 == store::sweeps::SWEEP_BATCH => {
                after = (scheduled_at, id);
            }
            _ => break,
        }
        if *stop.borrow() {
            break;
        }
    }
    let due_before =
        chrono::Utc::now() - chrono::Duration::from_std(settings.sweep_grace).unwrap_or_default();
    let mut plans = 0;
    let mut after = (
        chrono::DateTime::<chrono::Utc>::UNIX_EPOCH,
        uuid::Uuid::nil(),
    );
    loop {
        let page = store::sweeps::stranded_plans(&ctx.pool, due_before, after).await?;
        for &(booking_id, plan_attempt, _) in &page {
            if plan::requeue_stranded(&ctx.pool, booking_id, plan_attempt).await? {
                plans += 1;
                tracing::warn!(%booking_id, attempt = plan_attempt + 1, "planning had no live job; enqueued its next attempt");
            }
        }
        match page.last() {
            Some(&(id, _, due)) if page.len() as i64 == store::sweeps::SWEEP_BATCH => {
                after = (due, id)
            }
            _ => break,
        }
        if *stop.borrow() {
            break;
        }
    }
    ctx.metrics.swept(DELIVER_QUEUE, deliveries);
    ctx.metrics.swept(PLAN_QUEUE, plans);
    if deliveries > 0 {
        ctx.wakeups.poke(DELIVER_QUEUE);
    }
    if plans > 0 {
        ctx.wakeups.poke(PLAN_QUEUE);
    }
    Ok(deliveries + plans)
}

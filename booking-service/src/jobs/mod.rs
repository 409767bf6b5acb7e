//! The follow-up pipeline on apalis (PostgreSQL storage).
//!
//! ```text
//! CreateBooking ──(same statement)──▶ follow-up job (queue "plan"), due at event end + delay
//!   when due: scheduled_followups row, born claimed (one tx) ─▶ memory.StoreMessage ─▶ finish
//!   later, if needed: deliver job ─▶ claim ─▶ memory.StoreMessage ─▶ finish
//!                     (a retry, a re-drive, the sweep, a follow-up planned before it was due)
//! ```
//!
//! The runs due together share their hot statements (`batches`,
//! `coalesce`): the booking read, the insert and the finish are each one
//! multi-row statement for the runs that reach them at once.
//!
//! One job per booking: the wording is chosen from the emotion history as
//! it is when the event ends, and a follow-up costs one job's queue traffic.
//! Jobs run at least once, so both handlers are idempotent: the partial
//! unique index allows one live follow-up per booking and trigger, and
//! delivery stores the message with `request_id` = the follow-up's id.
//! Retries are new jobs scheduled with a later `run_at` (exponential backoff
//! with jitter, surviving restarts); a job carries its attempt number, and
//! an idempotency key per attempt keeps two racing runs from forking the
//! retry chain. Attempt numbers only grow: the next plan attempt is taken
//! by compare-and-set on the booking's `plan_attempt`, the next delivery
//! attempt by the claim on the follow-up, so a key is never reused and a
//! clash is never a silent drop (`store::jobs`).
//!
//! Delivery is claim, call, finish (`deliver`): a short statement claims the
//! follow-up with a lease, the call to memory-service holds no lock and no
//! connection, and a second short statement applies the outcome only while
//! the claim still holds. The safety nets (`workers`): the sweep re-enqueues
//! work whose job died, the poison guard (`poison`) dead-letters job rows
//! apalis cannot read, pruning deletes every kind of dead row.

pub mod batches;
pub mod coalesce;
pub mod deliver;
pub mod gauges;
pub mod plan;
pub mod poison;
pub mod reminders;
pub mod templates;
pub mod wakeups;
pub mod workers;

use std::{
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use apalis::prelude::BoxDynError;
use tracing::Instrument;

use maitre_runtime::{
    otel::{self, KeyValue, SpanKind, Status, Tracer},
    rpc::context::{CallContext, TraceParent},
};
use sqlx::PgPool;
use uuid::Uuid;

// The payloads and queue names live in the domain, where the store that
// enqueues them can read them too; re-exported here, where callers look.
pub use crate::domain::followup_jobs::{DELIVER_QUEUE, DeliverFollowUp, PLAN_QUEUE, PlanFollowUp};
use crate::{domain::backoff::Backoff, memory_client::MemoryClient, metrics::BookingMetrics};

/// How follow-ups are planned and retried.
#[derive(Debug, Clone)]
pub struct FollowUpPolicy {
    /// Delivery time = the event's end + this.
    pub delay_after_event: Duration,
    /// How many recent scored messages the template choice looks at.
    pub history_len: i32,
    /// Retries of planning while memory-service cannot answer.
    pub plan_retry: Backoff,
    /// Retries of delivery (the budget counts from the last re-drive).
    pub deliver_retry: Backoff,
    /// How long a delivery's claim on its follow-up lasts: longer than the
    /// memory-service call can take (its deadline, twice, for the one
    /// UNAVAILABLE retry), so an expired claim means the run died.
    pub claim_lease: Duration,
}

/// What every job handler needs (injected with apalis's `Data`).
#[derive(Clone)]
pub struct JobContext {
    pub pool: PgPool,
    pub memory: MemoryClient,
    pub templates: templates::TemplateCache,
    pub policy: FollowUpPolicy,
    pub metrics: Arc<BookingMetrics>,
    pub wakeups: wakeups::Wakeups,
    /// Sampling and span export: each run is a span of the trace it continues.
    pub tracer: Tracer,
    /// The planning read, the follow-up insert and the finish, coalesced
    /// across runs (`BOOKING_WORKER_BATCH_MAX`).
    pub statements: batches::HotStatements,
}

/// What a job run's exported span says about it.
struct JobRun {
    queue: &'static str,
    /// The span's name (the same as the run's log span).
    name: &'static str,
    attempt: u32,
    /// The attribute naming what the job works on, e.g. `("maitre.booking_id", id)`.
    subject: (&'static str, Uuid),
}

/// Runs one job: in its call context (the trace it continues, or a new one,
/// and a request id naming the job) and in the span `make_span` builds from
/// the trace id; records the run in the metrics and logs an unexpected error.
/// A recorded trace gets a consumer span for the run, under the span that
/// enqueued the job (its payload's `traceparent`), however long ago.
async fn run_job<W>(
    ctx: &JobContext,
    run: JobRun,
    call: CallContext,
    make_span: impl FnOnce(&str) -> tracing::Span,
    work: W,
) -> Result<(), BoxDynError>
where
    W: Future<Output = Result<(), sqlx::Error>>,
{
    let span = make_span(&call.trace.trace_id);
    let started = Instant::now();
    // Kept only when recorded: with export off nothing is cloned.
    let exported = call.tracer.is_recording(&call.trace).then(|| call.clone());
    let result = call.scope(work).instrument(span.clone()).await;
    let elapsed = started.elapsed();
    ctx.metrics.job_run(run.queue, result.is_ok(), elapsed);
    if let Some(call) = exported {
        record_run(&call, &run, &result, elapsed);
    }
    result.map_err(|error| {
        span.in_scope(|| tracing::error!(error = ?error, "job failed; apalis retries it at once"));
        error.into()
    })
}

/// Exports the span of a finished job run.
fn record_run(
    call: &CallContext,
    run: &JobRun,
    result: &Result<(), sqlx::Error>,
    elapsed: Duration,
) {
    let (start, end) = otel::started_before(elapsed);
    let (subject, id) = run.subject;
    call.tracer.record(otel::FinishedSpan {
        trace: &call.trace,
        parent_span_id: call.parent_span_id.as_deref(),
        parent_is_remote: true,
        kind: SpanKind::Consumer,
        name: run.name.into(),
        start,
        end,
        attributes: vec![
            KeyValue::new("messaging.system", "apalis"),
            KeyValue::new("messaging.operation.type", "process"),
            KeyValue::new("messaging.destination.name", run.queue),
            KeyValue::new("maitre.job.attempt", i64::from(run.attempt)),
            KeyValue::new("maitre.request_id", call.request_id.clone()),
            KeyValue::new(subject, id.to_string()),
        ],
        status: match result {
            Ok(()) => Status::Unset,
            Err(error) => Status::error(error.to_string()),
        },
    });
}

/// The call context a job runs in: the trace it continues (or a new one),
/// and a request id naming the job, for log lines and the memory call.
fn job_context(
    ctx: &JobContext,
    kind: &str,
    id: Uuid,
    attempt: u32,
    trace_parent: Option<&str>,
) -> CallContext {
    CallContext::continuing(
        format!("{kind}-{id}-{attempt}"),
        trace_parent.and_then(TraceParent::parse),
        &ctx.tracer,
    )
}

/// The current trace as a `traceparent` to hand to the next job.
fn current_trace() -> Option<String> {
    CallContext::current().map(|c| c.trace.header_value())
}

/// A uniform random number in [0, 1) for jitter.
fn jitter() -> f64 {
    rand::random::<f64>()
}

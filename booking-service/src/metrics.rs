//! booking-service's own metrics, beside the shared RPC and pool metrics:
//! queue depth by state (set by `jobs::gauges` from a cheap query of our
//! own, not apalis's heavy statistics; this module never reads the
//! database), job runs and
//! durations, follow-up and planning outcomes, the delay from booking to
//! plan start, and what the safety nets did: rows dead-lettered as
//! unreadable, work re-enqueued by the sweep, rows pruned, and
//! memory-service refusing our credentials.

use std::{sync::Arc, time::Duration};

use maitre_runtime::metrics::latency_histogram;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueState {
    queue: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobOutcome {
    queue: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct State {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueReason {
    queue: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Queue {
    queue: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Statement {
    statement: &'static str,
}

/// Batch sizes 1, 2, 4, … 128.
fn batch_size_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 8))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Kind {
    kind: &'static str,
}

#[derive(Debug)]
pub struct BookingMetrics {
    jobs: Family<QueueState, Gauge>,
    job_runs: Family<JobOutcome, Counter>,
    job_duration: Family<JobOutcome, Histogram, fn() -> Histogram>,
    followups: Family<State, Gauge>,
    deliveries: Family<Outcome, Counter>,
    plan_start_delay: Histogram,
    plans: Family<Outcome, Counter>,
    dead_lettered: Family<QueueReason, Counter>,
    swept: Family<Queue, Counter>,
    pruned: Family<Kind, Counter>,
    memory_config_errors: Family<CodeLabel, Counter>,
    batch_sizes: Family<Statement, Histogram, fn() -> Histogram>,
}

impl BookingMetrics {
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let metrics = Self {
            jobs: Family::default(),
            job_runs: Family::default(),
            job_duration: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            followups: Family::default(),
            deliveries: Family::default(),
            plan_start_delay: latency_histogram(),
            plans: Family::default(),
            dead_lettered: Family::default(),
            swept: Family::default(),
            pruned: Family::default(),
            memory_config_errors: Family::default(),
            batch_sizes: Family::new_with_constructor(batch_size_histogram as fn() -> Histogram),
        };
        registry.register(
            "jobs",
            "Follow-up jobs by queue and state (pending, scheduled, running, failed, killed); finished (done) jobs are history and not counted",
            metrics.jobs.clone(),
        );
        registry.register(
            "job_runs",
            "Follow-up job runs by queue and outcome (ok, error)",
            metrics.job_runs.clone(),
        );
        registry.register(
            "job_duration_seconds",
            "Follow-up job run time by queue and outcome",
            metrics.job_duration.clone(),
        );
        registry.register(
            "followups",
            "Follow-ups by state (pending, failed)",
            metrics.followups.clone(),
        );
        registry.register(
            "followup_deliveries",
            "Delivery attempts by outcome (sent, retried, failed, cancelled, erased, \
             sent_after_cancel, claim_lost, reminder_too_late)",
            metrics.deliveries.clone(),
        );
        registry.register(
            "followup_plans",
            "Plan runs by outcome (planned, already_planned, retried, fallback, stale)",
            metrics.plans.clone(),
        );
        registry.register(
            "jobs_dead_lettered",
            "Job rows apalis could not read, moved out of the queue (status Killed) by queue and \
             reason (bad_id, bad_payload, bad_metadata)",
            metrics.dead_lettered.clone(),
        );
        registry.register(
            "sweep_requeued",
            "Plannings and deliveries whose job had died, enqueued again by the sweep, by queue",
            metrics.swept.clone(),
        );
        registry.register(
            "pruned",
            "Rows deleted by pruning past BOOKING_JOB_RETENTION, by kind (jobs, workers)",
            metrics.pruned.clone(),
        );
        registry.register(
            "memory_config_errors",
            "Delivery attempts refused by memory-service for our credentials or set-up \
             (UNAUTHENTICATED, PERMISSION_DENIED, UNIMPLEMENTED), by code",
            metrics.memory_config_errors.clone(),
        );
        registry.register(
            "plan_start_delay_seconds",
            "Time from a follow-up job's due time (the event's end + BOOKING_FOLLOWUP_DELAY) to its first run's start",
            metrics.plan_start_delay.clone(),
        );
        registry.register(
            "followup_batch_size",
            "Follow-up job runs served by one coalesced statement (BOOKING_WORKER_BATCH_MAX), by \
             statement (to_plan, insert_planned, finish_sent)",
            metrics.batch_sizes.clone(),
        );
        Arc::new(metrics)
    }

    pub fn batch_size(&self, statement: &'static str, runs: usize) {
        self.batch_sizes
            .get_or_create(&Statement { statement })
            .observe(runs as f64);
    }

    pub fn job_run(&self, queue: &'static str, ok: bool, took: Duration) {
        let labels = JobOutcome {
            queue,
            outcome: if ok { "ok" } else { "error" },
        };
        self.job_runs.get_or_create(&labels).inc();
        self.job_duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    pub fn delivery(&self, outcome: &'static str) {
        self.deliveries.get_or_create(&Outcome { outcome }).inc();
    }

    pub fn plan(&self, outcome: &'static str) {
        self.plans.get_or_create(&Outcome { outcome }).inc();
    }

    pub fn dead_lettered(&self, queue: &'static str, reason: &'static str) {
        self.dead_lettered
            .get_or_create(&QueueReason { queue, reason })
            .inc();
    }

    pub fn swept(&self, queue: &'static str, count: u64) {
        self.swept.get_or_create(&Queue { queue }).inc_by(count);
    }

    pub fn pruned(&self, kind: &'static str, count: u64) {
        self.pruned.get_or_create(&Kind { kind }).inc_by(count);
    }

    pub fn memory_config_error(&self, code: tonic::Code) {
        self.memory_config_errors
            .get_or_create(&CodeLabel {
                code: format!("{code:?}"),
            })
            .inc();
    }

    pub fn plan_start_delay(&self, waited: Duration) {
        self.plan_start_delay.observe(waited.as_secs_f64());
    }

    /// Sets the job gauges from a fresh count per (queue, apalis status);
    /// states absent from `depth` are zero, not stale.
    pub fn set_queue_depth(&self, depth: impl IntoIterator<Item = (String, String, i64)>) {
        self.jobs.clear();
        for (queue, status, count) in depth {
            let state = match status.as_str() {
                "Pending" => "pending",
                "Scheduled" => "scheduled",
                "Queued" | "Running" => "running",
                "Done" => "done",
                "Failed" => "failed",
                "Killed" => "killed",
                _ => "other",
            };
            self.jobs
                .get_or_create(&QueueState { queue, state })
                .inc_by(count);
        }
    }

    /// Sets the follow-up gauges.
    pub fn set_followups(&self, pending: i64, failed: i64) {
        self.followups
            .get_or_create(&State { state: "pending" })
            .set(pending);
        self.followups
            .get_or_create(&State { state: "failed" })
            .set(failed);
    }
}

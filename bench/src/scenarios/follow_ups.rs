//! follow-ups: the apalis pipeline under booking-service, measured from
//! the database (booking-service runs with BOOKING_FOLLOWUP_DELAY=0 and 100 ms
//! polling).
//!
//! 1. Job start on an idle queue: bookings of events that end 200 ms later,
//!    made one at a time; for each, the time from its follow-up job's due
//!    time (`run_at`, the event's end) to its `lock_at` (set by apalis when
//!    a worker fetches the job).
//! 2. Throughput: N bookings on slots that all end at the same whole second
//!    (the due time), for customers with an emotion history; then the time
//!    from the due time until every follow-up is SENT.

use std::{sync::Arc, time::Duration};

use anyhow::{Context, Result};
use chrono::{DateTime, SubsecRound, Utc};
use futures::{StreamExt, stream};
use maitre_api::memory::v1::{self as memory, memory_service_client::MemoryServiceClient};
use serde::Serialize;
use sqlx::PgPool;
use tokio::sync::Mutex;
use tonic::transport::Channel;
use uuid::Uuid;

use super::{Endpoints, booking_client, booking_request, create_slot_at, memory_client, message};
use crate::{
    db,
    load::code_name,
    pg_cost::{self, PgCost},
    resources::{CpuUse, Probe},
    stats::{self, Errors, Spread},
};

/// Scored messages per customer conversation.
const HISTORY: usize = 3;
/// At most this many customers (conversations) share the N bookings.
const MAX_CUSTOMERS: usize = 100;
/// Slots the N bookings are spread over (all ending at the due time).
const SLOTS: usize = 8;
/// Concurrent calls while setting up.
const SETUP_CONCURRENCY: usize = 32;

#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub bookings: usize,
    pub plan_samples: usize,
    /// pg_stat_statements is there to read.
    pub pg_stats: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct FollowUpResult {
    pub plan_start: PlanStart,
    pub throughput: Throughput,
    /// PostgreSQL time per booking of the throughput part, from the first
    /// booking until the last follow-up was sent.
    pub pg_cost: Option<PgCost>,
}

/// How soon a follow-up job starts once due, on an idle queue.
#[derive(Debug, Clone, Serialize)]
pub struct PlanStart {
    /// From the job's due time (`run_at`: the event's end) to its `lock_at`
    /// (set by apalis when a worker fetches it).
    pub from_due_ms: Spread,
    pub errors: Errors,
}

/// Planning and delivering N follow-ups that come due together.
#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    pub bookings: usize,
    /// Time taken to create the bookings (32 concurrent calls).
    pub booking_seconds: f64,
    pub due_at: DateTime<Utc>,
    /// Follow-ups already planned when they came due (0: the one job per
    /// booking plans at the due time).
    pub planned_at_due: i64,
    pub sent: i64,
    pub failed: i64,
    pub cancelled: i64,
    /// Still pending, or not planned, when the bench stopped waiting.
    pub unfinished: i64,
    /// From the due time to the last SENT.
    pub seconds_due_to_last_sent: f64,
    /// `sent / seconds_due_to_last_sent`.
    pub delivered_per_second: f64,
    /// SENT time minus due time.
    pub lag_ms: Spread,
    pub cpu: CpuUse,
    pub errors: Errors,
}

pub async fn run(
    endpoints: &Endpoints,
    pool: &PgPool,
    probe: &Probe,
    settings: Settings,
    run: u64,
) -> Result<FollowUpResult> {
    let plan_start = plan_start(endpoints, pool, settings.plan_samples, run).await?;
    let (throughput, pg_cost) = throughput(endpoints, pool, probe, settings, run).await?;
    Ok(FollowUpResult {
        plan_start,
        throughput,
        pg_cost,
    })
}

/// A conversation of `HISTORY` scored user messages; returns its id.
async fn conversation(
    mut memory: MemoryServiceClient<Channel>,
    customer: &str,
) -> Result<String, tonic::Status> {
    let id = Uuid::now_v7().to_string();
    for _ in 0..HISTORY {
        memory
            .store_message(message(&id, customer, memory::Role::User, true))
            .await?;
    }
    Ok(id)
}

async fn plan_start(
    endpoints: &Endpoints,
    pool: &PgPool,
    samples: usize,
    run: u64,
) -> Result<PlanStart> {
    let mut booking = booking_client(endpoints).await?;
    let customer = format!("bench-{run}-plan");
    let conversation = conversation(memory_client(endpoints).await?, &customer)
        .await
        .context("storing the plan-start customer's history")?;
    let mut errors = Errors::new();
    let mut from_due = Vec::new();
    for _ in 0..samples {
        db::drain(pool, Duration::from_secs(30)).await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
        // An event that starts in 150 ms and ends 50 ms later: its
        // follow-up job comes due 200 ms from now (BOOKING_FOLLOWUP_DELAY=0).
        let start = Utc::now() + chrono::Duration::milliseconds(150);
        let slot = create_slot_at(
            &mut booking,
            start,
            start + chrono::Duration::milliseconds(50),
            10,
        )
        .await
        .context("creating a plan-start slot")?;
        let response = booking
            .create_booking(booking_request(&slot, &customer, &conversation))
            .await;
        let booking_id = match response {
            Ok(r) => r
                .into_inner()
                .booking
                .map(|b| b.booking_id)
                .unwrap_or_default(),
            Err(status) => {
                stats::count_error(&mut errors, code_name(&status), status.message());
                continue;
            }
        };
        match lock_delay(pool, &booking_id).await? {
            Some((due, locked)) => from_due.push(millis(locked - due)),
            None => stats::count_error(
                &mut errors,
                "follow-up job not started within 10 s of due",
                booking_id,
            ),
        }
    }
    Ok(PlanStart {
        from_due_ms: Spread::of(&from_due),
        errors,
    })
}

fn millis(d: chrono::TimeDelta) -> f64 {
    d.num_microseconds().unwrap_or(i64::MAX) as f64 / 1000.0
}

/// The booking's follow-up job's due time (`run_at`) and `lock_at`, once set.
async fn lock_delay(
    pool: &PgPool,
    booking_id: &str,
) -> Result<Option<(DateTime<Utc>, DateTime<Utc>)>> {
    let id: Uuid = booking_id.parse().context("booking id")?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(11);
    while tokio::time::Instant::now() < deadline {
        let row: Option<(DateTime<Utc>, Option<DateTime<Utc>>)> = sqlx::query_as(
            "SELECT j.run_at, j.lock_at FROM apalis.jobs j \
             WHERE j.idempotency_key = $1 AND j.job_type = $2",
        )
        .bind(format!("{id}/1"))
        .bind(booking_service::jobs::PLAN_QUEUE)
        .fetch_optional(pool)
        .await?;
        if let Some((due, Some(locked))) = row {
            return Ok(Some((due, locked)));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(None)
}

async fn throughput(
    endpoints: &Endpoints,
    pool: &PgPool,
    probe: &Probe,
    settings: Settings,
    run: u64,
) -> Result<(Throughput, Option<PgCost>)> {
    let n = settings.bookings;
    let errors = Arc::new(Mutex::new(Errors::new()));
    let customers: Vec<String> = (0..n.clamp(1, MAX_CUSTOMERS))
        .map(|i| format!("bench-{run}-fu-{i}"))
        .collect();
    let memory = memory_client(endpoints).await?;
    let conversations: Vec<String> = stream::iter(customers.iter())
        .map(|c| conversation(memory.clone(), c))
        .buffered(SETUP_CONCURRENCY)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .context("storing the customers' emotion history")?;

    // Room to create every booking before the slots start (a second before due).
    let lead = Duration::from_secs(2) + Duration::from_millis(4 * n as u64);
    let due = (Utc::now() + lead).trunc_subsecs(0) + chrono::Duration::seconds(1);
    let mut booking = booking_client(endpoints).await?;
    let capacity = i32::try_from(n.div_ceil(SLOTS) + 1)?.min(10_000);
    let mut slots = Vec::new();
    for _ in 0..SLOTS {
        slots.push(
            create_slot_at(
                &mut booking,
                due - chrono::Duration::seconds(1),
                due,
                capacity,
            )
            .await
            .context("creating a follow-up slot")?,
        );
    }

    if settings.pg_stats {
        pg_cost::reset(pool).await?;
    }
    let started = tokio::time::Instant::now();
    let ids: Vec<Uuid> = stream::iter(0..n)
        .map(|i| {
            let (slot, customer, conversation) = (
                slots[i % SLOTS].clone(),
                customers[i % customers.len()].clone(),
                conversations[i % conversations.len()].clone(),
            );
            let (errors, mut client) = (errors.clone(), booking.clone());
            async move {
                match client
                    .create_booking(booking_request(&slot, &customer, &conversation))
                    .await
                {
                    Ok(r) => r.into_inner().booking?.booking_id.parse::<Uuid>().ok(),
                    Err(status) => {
                        let mut e = errors.lock().await;
                        stats::count_error(&mut e, code_name(&status), status.message());
                        None
                    }
                }
            }
        })
        .buffer_unordered(SETUP_CONCURRENCY)
        .filter_map(|id| async move { id })
        .collect()
        .await;
    let booking_seconds = started.elapsed().as_secs_f64();
    if ids.len() < n {
        stats::count_error(
            &mut *errors.lock().await,
            "bookings not created",
            format!("{} of {n}", n - ids.len()),
        );
    }

    let until_due = (due - Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(until_due).await;
    let at_due = progress(pool, &ids).await?;
    let before = probe.snapshot()?;
    let deadline = tokio::time::Instant::now()
        + Duration::from_secs(60)
        + Duration::from_millis(20 * n as u64);
    let mut last = at_due;
    while !last.finished(ids.len()) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(25)).await;
        last = progress(pool, &ids).await?;
    }
    let after = probe.snapshot()?;
    let pg_cost = match settings.pg_stats {
        true => {
            let mut tally = pg_cost::Tally::default();
            tally.add_reading(pool).await?;
            tally.cost(&super::Scenario::FollowUps.own_statements())
        }
        false => None,
    };
    if !last.finished(ids.len()) {
        stats::count_error(
            &mut *errors.lock().await,
            "follow-ups unfinished at the deadline",
            format!("{:?}", last),
        );
    }

    let (last_sent_s, lag) = delivery_times(pool, &ids, due).await?;
    let errors = errors.lock().await.clone();
    let throughput = Throughput {
        bookings: ids.len(),
        booking_seconds,
        due_at: due,
        planned_at_due: at_due.planned,
        sent: last.sent,
        failed: last.failed,
        cancelled: last.cancelled,
        unfinished: ids.len() as i64 - last.sent - last.failed - last.cancelled,
        seconds_due_to_last_sent: last_sent_s,
        delivered_per_second: if last_sent_s > 0.0 {
            last.sent as f64 / last_sent_s
        } else {
            0.0
        },
        lag_ms: lag,
        cpu: probe.between(&before, &after),
        errors,
    };
    Ok((throughput, pg_cost))
}

#[derive(Debug, Clone, Copy)]
struct Progress {
    planned: i64,
    sent: i64,
    failed: i64,
    cancelled: i64,
}

impl Progress {
    fn finished(&self, n: usize) -> bool {
        self.planned == n as i64 && self.sent + self.failed + self.cancelled == n as i64
    }
}

async fn progress(pool: &PgPool, ids: &[Uuid]) -> Result<Progress> {
    let (planned, sent, failed, cancelled): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE state = 2), \
                count(*) FILTER (WHERE state = 4), count(*) FILTER (WHERE state = 3) \
         FROM booking.scheduled_followups WHERE booking_id = ANY($1)",
    )
    .bind(ids)
    .fetch_one(pool)
    .await
    .context("reading follow-up progress")?;
    Ok(Progress {
        planned,
        sent,
        failed,
        cancelled,
    })
}

/// Seconds from `due` to the last SENT, and the spread of SENT − due.
async fn delivery_times(pool: &PgPool, ids: &[Uuid], due: DateTime<Utc>) -> Result<(f64, Spread)> {
    let lags: Vec<f64> = sqlx::query_scalar(
        "SELECT (extract(epoch FROM sent_at - $2) * 1000)::float8 \
         FROM booking.scheduled_followups WHERE booking_id = ANY($1) AND state = 2",
    )
    .bind(ids)
    .bind(due)
    .fetch_all(pool)
    .await
    .context("reading delivery times")?;
    let last = lags.iter().copied().fold(0.0_f64, f64::max) / 1000.0;
    Ok((last, Spread::of(&lags)))
}

//! The follow-up job: one per booking, due at the event's end + delay
//! (CreateBooking enqueues it). It chooses the wording from the customer's
//! emotion history as it is then, and delivers the follow-up in the same
//! run: the follow-up row is born claimed for its first delivery attempt,
//! and the run goes on with the deliver job's call and finish. Deliver jobs
//! remain for what comes later: retries, re-drives, the sweep, and a
//! follow-up planned before it is due (a plan retried or re-enqueued early).
//!
//! Invariant: every confirmed booking ends with exactly one follow-up (the
//! partial unique index), and stays in `bookings_unplanned_due_idx` until it has
//! one. Whatever fails when, some live job holds its newest plan attempt or
//! the sweep enqueues the next one: a retry is taken by compare-and-set on
//! the booking's `plan_attempt`, never restarts at 1, and after
//! `BOOKING_FOLLOWUP_PLAN_MAX_ATTEMPTS` the neutral template is used.

use apalis::prelude::{BoxDynError, Data};
use chrono::Utc;
use uuid::Uuid;

use super::{
    DELIVER_QUEUE, DeliverFollowUp, JobContext, JobRun, PLAN_QUEUE, PlanFollowUp, current_trace,
    deliver, jitter, job_context, run_job,
};
use crate::{
    domain::{
        POST_EVENT_TRIGGER,
        booking::CONFIRMED,
        template::{EmotionSummary, choose, render},
    },
    memory_client::MemoryError,
    store::{
        self,
        followups::{Claimed, NewFollowUp, PENDING},
        jobs::Enqueued,
    },
};

/// apalis handler. Errors returned here are unexpected (database trouble);
/// expected failures are retried by re-scheduling, inside `plan`.
pub async fn handle(job: PlanFollowUp, ctx: Data<JobContext>) -> Result<(), BoxDynError> {
    let call = job_context(
        &ctx,
        "plan",
        job.booking_id,
        job.attempt,
        job.trace_parent.as_deref(),
    );
    let make_span = |trace_id: &str| tracing::info_span!("plan_follow_up", booking_id = %job.booking_id, attempt = job.attempt, trace_id);
    let run = JobRun {
        queue: PLAN_QUEUE,
        name: "plan_follow_up",
        attempt: job.attempt,
        subject: ("maitre.booking_id", job.booking_id),
    };
    run_job(&ctx, run, call, make_span, plan(&job, &ctx)).await
}

/// What a run of a plan attempt must do about a memory-service failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RetryPlan {
    /// This run took the next attempt and enqueued it.
    Scheduled,
    /// Another run (of this attempt, or the sweep) took it first, or the
    /// booking was planned or cancelled meanwhile: nothing to do.
    Stale,
}

async fn plan(job: &PlanFollowUp, ctx: &JobContext) -> Result<(), sqlx::Error> {
    let Some(booking) = ctx.statements.to_plan(job.booking_id).await? else {
        tracing::warn!("booking not found; nothing to plan");
        return Ok(());
    };
    let delay = chrono::Duration::from_std(ctx.policy.delay_after_event).unwrap_or_default();
    let due = booking.slot_ends_at + delay;
    if job.attempt == 1 {
        let waited = (Utc::now() - due).to_std().unwrap_or_default();
        ctx.metrics.plan_start_delay(waited);
    }
    if booking.state != CONFIRMED {
        tracing::info!("booking cancelled before planning; no follow-up");
        return Ok(());
    }
    if booking.planned_at.is_some() {
        ctx.metrics.plan("already_planned");
        // A run of this job planned it and may have died before delivering.
        return deliver_first_if_due(ctx, booking.id).await;
    }

    let summary = match booking.conversation_id {
        None => EmotionSummary::default(),
        Some(conversation_id) => match ctx
            .memory
            .emotion_scores(conversation_id, ctx.policy.history_len)
            .await
        {
            Ok(scores) => EmotionSummary { scores },
            Err(MemoryError::NotFound) => {
                tracing::info!(%conversation_id, "conversation unknown to memory-service; neutral wording");
                EmotionSummary::default()
            }
            Err(error) if !ctx.policy.plan_retry.exhausted(job.attempt) => {
                let delay = ctx.policy.plan_retry.delay(job.attempt, jitter());
                match schedule_retry(ctx, job, delay).await? {
                    RetryPlan::Scheduled => {
                        ctx.metrics.plan("retried");
                        tracing::warn!(%error, ?delay, "emotion history unavailable; planning again later");
                    }
                    RetryPlan::Stale => {
                        ctx.metrics.plan("stale");
                        tracing::info!(%error, "emotion history unavailable, but a later attempt already owns this planning");
                    }
                }
                return Ok(());
            }
            // Better a neutral follow-up than none: delivery has its own
            // retries should memory-service still be away.
            Err(error) => {
                ctx.metrics.plan("fallback");
                tracing::warn!(%error, "planning attempts exhausted; falling back to the neutral template");
                EmotionSummary::default()
            }
        },
    };

    let templates = ctx.templates.get(&ctx.pool).await?;
    let Some(template) = choose(&templates, POST_EVENT_TRIGGER, &summary) else {
        // Unplanned, so the sweep tries again once the templates are fixed.
        return Err(sqlx::Error::Protocol(
            "no follow-up template matches: booking.followup_templates needs one with requires_history = false".into(),
        ));
    };
    let rendered_text = render(&template.body, &booking.render_context());
    let follow_up = NewFollowUp {
        id: Uuid::now_v7(),
        booking_id: booking.id,
        customer_id: booking.customer_id.clone(),
        conversation_id: booking.conversation_id,
        trigger: POST_EVENT_TRIGGER,
        template_key: template.key.clone(),
        rendered_text,
        scheduled_at: due,
        plan_attempts: i32::try_from(job.attempt).unwrap_or(i32::MAX),
    };

    // The follow-up and the end of planning commit together, in one
    // statement: a booking leaves the unplanned set only with its follow-up.
    // Due now (the normal case: this job came due at the event's end), the
    // row is born claimed by this run, which delivers it next; due later,
    // its first deliver job commits with it.
    let now = maitre_runtime::db::now();
    let deliver_now = follow_up.scheduled_at <= now;
    let token = Uuid::now_v7();
    let inserted = if deliver_now {
        ctx.statements.insert_claimed(&follow_up, token).await?
    } else {
        let mut tx = ctx.pool.begin().await?;
        let inserted = store::followups::insert_planned(&mut tx, &follow_up, now, None).await?;
        if inserted == Some(PENDING) {
            let deliver = DeliverFollowUp {
                follow_up_id: follow_up.id,
                attempt: 1,
                trace_parent: current_trace(),
            };
            store::jobs::push_first_deliver(&mut tx, &deliver, follow_up.scheduled_at).await?;
        }
        tx.commit().await?;
        inserted
    };
    let Some(state) = inserted else {
        // A live follow-up exists already (a racing run of this job planned
        // it) or the booking was cancelled meanwhile: planning is over. If
        // that run died before delivering, this one delivers (the claim
        // decides).
        ctx.metrics.plan("already_planned");
        tracing::debug!("follow-up already planned or booking cancelled meanwhile");
        return if deliver_now {
            deliver_first_if_due(ctx, booking.id).await
        } else {
            Ok(())
        };
    };
    ctx.metrics.plan("planned");
    tracing::info!(
        follow_up_id = %follow_up.id,
        template = %follow_up.template_key,
        scheduled_at = %follow_up.scheduled_at,
        born_cancelled = state != PENDING,
        "follow-up planned"
    );
    if state != PENDING {
        // Born cancelled (the customer was erased): nothing to deliver.
        return Ok(());
    }
    if !deliver_now {
        ctx.wakeups.wake_at(DELIVER_QUEUE, follow_up.scheduled_at);
        return Ok(());
    }
    let claimed = Claimed {
        id: follow_up.id,
        booking_id: follow_up.booking_id,
        trigger: POST_EVENT_TRIGGER.to_owned(),
        customer_id: follow_up.customer_id,
        conversation_id: follow_up.conversation_id,
        template_key: follow_up.template_key,
        rendered_text: follow_up.rendered_text,
        attempts: 0,
        retry_from: 0,
        last_error: None,
    };
    deliver::call_and_finish(ctx, 1, &claimed, token).await
}

/// A re-run of the job of a booking already planned (jobs run at least
/// once: the run that planned may have died before delivering): makes the
/// first delivery attempt if it is due and nobody made it yet. The claim
/// decides between this run and any other (a deliver job, the sweep's).
async fn deliver_first_if_due(ctx: &JobContext, booking_id: Uuid) -> Result<(), sqlx::Error> {
    let Some(live) =
        store::followups::live_for_booking(&ctx.pool, booking_id, POST_EVENT_TRIGGER).await?
    else {
        return Ok(());
    };
    if live.state != PENDING || live.attempts != 0 || live.scheduled_at > Utc::now() {
        tracing::debug!(
            follow_up_id = %live.id,
            state = live.state,
            attempts = live.attempts,
            "already planned, and its first delivery is made or not yet due; nothing to do"
        );
        return Ok(());
    }
    let first = DeliverFollowUp {
        follow_up_id: live.id,
        attempt: 1,
        trace_parent: current_trace(),
    };
    deliver::deliver(&first, ctx).await
}

/// Takes the next plan attempt (compare-and-set on the booking) and enqueues
/// it after `delay`, in one transaction.
async fn schedule_retry(
    ctx: &JobContext,
    job: &PlanFollowUp,
    delay: std::time::Duration,
) -> Result<RetryPlan, sqlx::Error> {
    let next = job.attempt + 1;
    let mut tx = ctx.pool.begin().await?;
    if !store::planning::advance(&mut tx, job.booking_id, next).await? {
        tx.rollback().await?;
        return Ok(RetryPlan::Stale);
    }
    let retry = PlanFollowUp {
        booking_id: job.booking_id,
        attempt: next,
        trace_parent: current_trace(),
    };
    if store::jobs::push_plan(&mut tx, &retry, Some(delay)).await? == Enqueued::AlreadyLive {
        // Cannot happen while keys are never reused; if it does, that live
        // job plans this very attempt, so the chain goes on all the same.
        tracing::warn!(
            attempt = next,
            "a live job already held the next plan attempt's key"
        );
    }
    tx.commit().await?;
    Ok(RetryPlan::Scheduled)
}

/// Enqueues the next plan attempt of a booking whose newest attempt
/// `plan_attempt` has no live job any more (the sweep). Returns false when
/// another run moved the attempt on first.
pub async fn requeue_stranded(
    pool: &sqlx::PgPool,
    booking_id: Uuid,
    plan_attempt: i32,
) -> Result<bool, sqlx::Error> {
    let next = u32::try_from(plan_attempt).unwrap_or(0) + 1;
    let mut tx = pool.begin().await?;
    if !store::planning::advance(&mut tx, booking_id, next).await? {
        tx.rollback().await?;
        return Ok(false);
    }
    let job = PlanFollowUp {
        booking_id,
        attempt: next,
        trace_parent: None,
    };
    store::jobs::push_plan(&mut tx, &job, None).await?;
    tx.commit().await?;
    Ok(true)
}

//! The plan job: choose the wording from the customer's emotion history and
//! schedule the delivery.
//!
//! Invariant: every confirmed booking ends with exactly one follow-up (the
//! partial unique index), and stays in `bookings_unplanned_idx` until it has
//! one. Whatever fails when, some live job holds its newest plan attempt or
//! the sweep enqueues the next one: a retry is taken by compare-and-set on
//! the booking's `plan_attempt`, never restarts at 1, and after
//! `BOOKING_FOLLOWUP_PLAN_MAX_ATTEMPTS` the neutral template is used.

use apalis::prelude::{BoxDynError, Data};
use chrono::Utc;
use uuid::Uuid;

use super::{
    DELIVER_QUEUE, DeliverFollowUp, JobContext, JobRun, PLAN_QUEUE, PlanFollowUp, current_trace,
    jitter, job_context, run_job,
};
use crate::{
    domain::{
        POST_EVENT_TRIGGER,
        booking::CONFIRMED,
        template::{EmotionSummary, RenderContext, choose, render},
    },
    memory_client::MemoryError,
    store::{self, followups::NewFollowUp, jobs::Enqueued},
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
    let Some(booking) = store::bookings::get(&ctx.pool, job.booking_id).await? else {
        tracing::warn!("booking not found; nothing to plan");
        return Ok(());
    };
    if job.attempt == 1 {
        let waited = (Utc::now() - booking.created_at)
            .to_std()
            .unwrap_or_default();
        ctx.metrics.plan_start_delay(waited);
    }
    if booking.state != CONFIRMED {
        tracing::info!("booking cancelled before planning; no follow-up");
        return Ok(());
    }
    let progress = store::planning::progress(&ctx.pool, booking.id).await?;
    if progress.is_some_and(|p| p.planned_at.is_some()) {
        tracing::debug!("already planned; nothing to do");
        ctx.metrics.plan("already_planned");
        return Ok(());
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
    let Some(template) = choose(&templates, &summary) else {
        // Unplanned, so the sweep tries again once the templates are fixed.
        return Err(sqlx::Error::Protocol(
            "no follow-up template matches: booking.followup_templates needs one with requires_history = false".into(),
        ));
    };
    let rendered_text = render(
        &template.body,
        &RenderContext {
            customer_name: &booking.customer_name,
            party_size: booking.party_size,
            slot_label: &booking.slot_label,
            event_start: booking.slot_starts_at,
        },
    );
    let delay = chrono::Duration::from_std(ctx.policy.delay_after_event).unwrap_or_default();
    let follow_up = NewFollowUp {
        id: Uuid::now_v7(),
        booking_id: booking.id,
        customer_id: booking.customer_id.clone(),
        conversation_id: booking.conversation_id,
        trigger: POST_EVENT_TRIGGER,
        template_key: template.key.clone(),
        rendered_text,
        scheduled_at: booking.slot_ends_at + delay,
        plan_attempts: i32::try_from(job.attempt).unwrap_or(i32::MAX),
    };

    // The follow-up, its first delivery job and the end of planning commit
    // together: a booking leaves the unplanned set only with its follow-up.
    let now = maitre_runtime::db::now();
    let mut tx = ctx.pool.begin().await?;
    let inserted = store::followups::insert(&mut tx, &follow_up, now).await?;
    if inserted {
        let deliver = DeliverFollowUp {
            follow_up_id: follow_up.id,
            attempt: 1,
            trace_parent: current_trace(),
        };
        store::jobs::push_first_deliver(&mut tx, &deliver, follow_up.scheduled_at).await?;
    }
    // Not inserted: a live follow-up exists already (a racing run planned
    // it) or the booking was cancelled meanwhile; either way planning is over.
    store::planning::mark_planned(&mut tx, booking.id, now).await?;
    tx.commit().await?;
    if inserted {
        if follow_up.scheduled_at <= now {
            ctx.wakeups.poke(DELIVER_QUEUE);
        } else {
            ctx.wakeups.wake_at(DELIVER_QUEUE, follow_up.scheduled_at);
        }
    }
    if inserted {
        ctx.metrics.plan("planned");
        tracing::info!(
            follow_up_id = %follow_up.id,
            template = %follow_up.template_key,
            scheduled_at = %follow_up.scheduled_at,
            "follow-up planned"
        );
    } else {
        ctx.metrics.plan("already_planned");
        tracing::debug!("follow-up already planned or booking cancelled meanwhile");
    }
    Ok(())
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

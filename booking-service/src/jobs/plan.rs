//! The plan job: choose the wording from the customer's emotion history and
//! schedule the delivery.

use apalis::prelude::{BoxDynError, Data};
use chrono::Utc;
use uuid::Uuid;

use super::{
    DeliverFollowUp, JobContext, PLAN_QUEUE, PlanFollowUp, current_trace, jitter, job_context,
    run_job,
};
use crate::{
    domain::{
        POST_EVENT_TRIGGER,
        booking::CONFIRMED,
        template::{EmotionSummary, RenderContext, choose, render},
    },
    memory_client::MemoryError,
    store::{self, followups::NewFollowUp},
};

/// apalis handler. Errors returned here are unexpected (database trouble);
/// expected failures are retried by re-scheduling, inside `plan`.
pub async fn handle(job: PlanFollowUp, ctx: Data<JobContext>) -> Result<(), BoxDynError> {
    let call = job_context(
        "plan",
        job.booking_id,
        job.attempt,
        job.trace_parent.as_deref(),
    );
    let make_span = |trace_id: &str| tracing::info_span!("plan_follow_up", booking_id = %job.booking_id, attempt = job.attempt, trace_id);
    run_job(&ctx, PLAN_QUEUE, call, make_span, plan(&job, &ctx)).await
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
                tracing::warn!(%error, ?delay, "emotion history unavailable; planning again later");
                let mut tx = ctx.pool.begin().await?;
                let retry = PlanFollowUp {
                    booking_id: booking.id,
                    attempt: job.attempt + 1,
                    trace_parent: current_trace(),
                };
                store::jobs::push_plan(&mut tx, &retry, Some(delay)).await?;
                tx.commit().await?;
                return Ok(());
            }
            // Better a neutral follow-up than none: delivery has its own
            // retries should memory-service still be away.
            Err(error) => {
                tracing::warn!(%error, "planning attempts exhausted; falling back to the neutral template");
                EmotionSummary::default()
            }
        },
    };

    let templates = ctx.templates.get(&ctx.pool).await?;
    let Some(template) = choose(&templates, &summary) else {
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

    let mut tx = ctx.pool.begin().await?;
    if store::followups::insert(&mut tx, &follow_up, maitre::db::now()).await? {
        let deliver = DeliverFollowUp {
            follow_up_id: follow_up.id,
            attempt: 1,
            trace_parent: current_trace(),
        };
        store::jobs::push_first_deliver(&mut tx, &deliver, follow_up.scheduled_at).await?;
        tx.commit().await?;
        tracing::info!(
            follow_up_id = %follow_up.id,
            template = %follow_up.template_key,
            scheduled_at = %follow_up.scheduled_at,
            "follow-up planned"
        );
    } else {
        tx.commit().await?;
        tracing::debug!("follow-up already planned or booking cancelled meanwhile");
    }
    Ok(())
}

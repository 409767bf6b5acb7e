//! The deliver job: store the follow-up in memory-service, exactly once.

use std::collections::HashMap;

use apalis::prelude::{BoxDynError, Data};
use maitre::api::memory::v1 as memory;

use super::{
    DELIVER_QUEUE, DeliverFollowUp, JobContext, current_trace, jitter, job_context, run_job,
};
use crate::{
    domain::booking::CONFIRMED,
    store::{self, followups::PENDING},
};

pub async fn handle(job: DeliverFollowUp, ctx: Data<JobContext>) -> Result<(), BoxDynError> {
    let call = job_context(
        "deliver",
        job.follow_up_id,
        job.attempt,
        job.trace_parent.as_deref(),
    );
    let make_span = |trace_id: &str| tracing::info_span!("deliver_follow_up", follow_up_id = %job.follow_up_id, attempt = job.attempt, trace_id);
    run_job(&ctx, DELIVER_QUEUE, call, make_span, deliver(&job, &ctx)).await
}

async fn deliver(job: &DeliverFollowUp, ctx: &JobContext) -> Result<(), sqlx::Error> {
    // The row stays locked until commit: a concurrent CancelBooking waits,
    // so a follow-up is either cancelled or sent, never cancelled-and-sent.
    let mut tx = ctx.pool.begin().await?;
    let Some(row) = store::followups::lock_for_delivery(&mut tx, job.follow_up_id).await? else {
        tracing::warn!("follow-up not found; nothing to deliver");
        return Ok(());
    };
    let follow_up = row.follow_up;
    if follow_up.state != PENDING {
        tracing::debug!(state = follow_up.state, "no longer pending; nothing to do");
        return Ok(());
    }
    if row.booking_state != CONFIRMED {
        store::followups::mark_cancelled(&mut tx, follow_up.id, maitre::db::now()).await?;
        tx.commit().await?;
        ctx.metrics.delivery("cancelled");
        tracing::info!("booking cancelled; follow-up cancelled");
        return Ok(());
    }
    if i64::from(follow_up.attempts) != i64::from(job.attempt) - 1 {
        tracing::debug!(
            recorded_attempts = follow_up.attempts,
            "stale attempt; another run owns this follow-up"
        );
        return Ok(());
    }

    let request = memory::StoreMessageRequest {
        conversation_id: follow_up
            .conversation_id
            .map(|c| c.to_string())
            .unwrap_or_default(),
        user_id: follow_up.customer_id.clone(),
        channel: "follow-up".into(),
        role: memory::Role::Assistant as i32,
        content: follow_up.rendered_text.clone(),
        metadata: HashMap::from([
            ("booking_id".into(), follow_up.booking_id.to_string()),
            ("follow_up_id".into(), follow_up.id.to_string()),
            ("template".into(), follow_up.template_key.clone()),
        ]),
        request_id: follow_up.id.to_string(),
        ..Default::default()
    };
    let now = maitre::db::now();
    match ctx.memory.store_follow_up(request).await {
        Ok(message_id) => {
            store::followups::mark_sent(&mut tx, follow_up.id, message_id, now).await?;
            tx.commit().await?;
            ctx.metrics.delivery("sent");
            tracing::info!(%message_id, template = %follow_up.template_key, "follow-up delivered");
        }
        Err(error) => {
            let permanent = error.is_permanent();
            if permanent || ctx.policy.deliver_retry.exhausted(job.attempt) {
                store::followups::record_failure(
                    &mut tx,
                    follow_up.id,
                    &error.to_string(),
                    None,
                    now,
                )
                .await?;
                tx.commit().await?;
                ctx.metrics.delivery("failed");
                tracing::error!(%error, attempts = job.attempt, permanent, "follow-up FAILED: giving up (dead letter)");
            } else {
                let delay = ctx.policy.deliver_retry.delay(job.attempt, jitter());
                let next_at = now + chrono::Duration::from_std(delay).unwrap_or_default();
                store::followups::record_failure(
                    &mut tx,
                    follow_up.id,
                    &error.to_string(),
                    Some(next_at),
                    now,
                )
                .await?;
                let retry = DeliverFollowUp {
                    follow_up_id: follow_up.id,
                    attempt: job.attempt + 1,
                    trace_parent: current_trace(),
                };
                store::jobs::push_deliver(&mut tx, &retry, next_at).await?;
                tx.commit().await?;
                ctx.metrics.delivery("retried");
                tracing::warn!(%error, ?delay, "delivery failed; retrying later");
            }
        }
    }
    Ok(())
}

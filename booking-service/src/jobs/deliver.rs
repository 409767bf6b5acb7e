//! The deliver job: store the follow-up in memory-service, exactly once.
//!
//! Claim, call, finish — no lock and no database connection is held across
//! the network:
//!
//! 1. **Claim** (one short statement): the follow-up must be PENDING, its
//!    booking CONFIRMED, no attempt made since this job was enqueued, and no
//!    other unexpired claim on it; it gets this run's token until
//!    `claimed_until` (the lease, longer than the call can take).
//! 2. **Call** memory-service's StoreMessage with `request_id` = the
//!    follow-up's id: however often it is repeated, one message is stored.
//! 3. **Finish** (one short statement, plus the next job on a retry): applies
//!    only while this run's token is still on the row.
//!
//! A CancelBooking meanwhile is never blocked: it cancels the PENDING row at
//! once. The rule for a cancel that lands while the message is on its way:
//! **the cancel wins the state, the delivery is recorded** — the follow-up
//! stays CANCELLED and gets the stored `message_id`, `sent_at` and a
//! `last_error` starting with `SENT_AFTER_CANCEL` (metric outcome
//! `sent_after_cancel`), so a message that did reach memory-service is never
//! unaccounted for. The window is one call (≤ 2 × `BOOKING_MEMORY_CALL_TIMEOUT`). We
//! chose this over making the cancel wait for the lease because a cancel
//! waiting on a slow memory-service would hold the booking and slot rows and
//! stall every CreateBooking of the slot — the very stall this design removes.
//!
//! A run whose lease ran out (it hung past it) loses its claim: its finish
//! applies nothing, and the run that claimed next finishes with the same
//! message (memory-service answers the repeated `request_id` with it).

use std::collections::HashMap;

use apalis::prelude::{BoxDynError, Data};
use maitre_api::memory::v1 as memory;
use uuid::Uuid;

use super::{
    DELIVER_QUEUE, DeliverFollowUp, JobContext, JobRun, current_trace, jitter, job_context,
    reminders, run_job,
};
use crate::{
    domain::booking::CONFIRMED,
    memory_client::{CONVERSATION_ERASED, FailureKind, MemoryError},
    store::{
        self,
        followups::{AfterFailure, CANCELLED, Claimed, PENDING, SENT},
        jobs::Enqueued,
    },
};

pub async fn handle(job: DeliverFollowUp, ctx: Data<JobContext>) -> Result<(), BoxDynError> {
    let call = job_context(
        &ctx,
        "deliver",
        job.follow_up_id,
        job.attempt,
        job.trace_parent.as_deref(),
    );
    let make_span = |trace_id: &str| tracing::info_span!("deliver_follow_up", follow_up_id = %job.follow_up_id, attempt = job.attempt, trace_id);
    let run = JobRun {
        queue: DELIVER_QUEUE,
        name: "deliver_follow_up",
        attempt: job.attempt,
        subject: ("maitre.follow_up_id", job.follow_up_id),
    };
    run_job(&ctx, run, call, make_span, deliver(&job, &ctx)).await
}

/// Claims the follow-up for `job.attempt`, then calls and finishes.
pub(super) async fn deliver(job: &DeliverFollowUp, ctx: &JobContext) -> Result<(), sqlx::Error> {
    let attempts_made = i32::try_from(job.attempt.saturating_sub(1)).unwrap_or(i32::MAX);
    let token = Uuid::now_v7();
    let mut waits = 0;
    let follow_up = loop {
        if let Some(claimed) = store::followups::claim(
            &ctx.pool,
            job.follow_up_id,
            attempts_made,
            token,
            ctx.policy.claim_lease,
        )
        .await?
        {
            break claimed;
        }
        match explain_unclaimed(job, ctx).await? {
            // Another run of this attempt holds the claim. If it died (its
            // process was killed, its job re-enqueued to us), nobody else
            // would finish it before the sweep: wait the lease out once and
            // claim again; if it lives, it will have finished by then.
            Some(held_until) if waits < 1 => {
                waits += 1;
                let left = (held_until - chrono::Utc::now())
                    .to_std()
                    .unwrap_or_default()
                    .min(ctx.policy.claim_lease);
                tokio::time::sleep(left + std::time::Duration::from_millis(100)).await;
            }
            _ => return Ok(()),
        }
    };

    // A reminder is worded now, from its booking as it is (or cancelled).
    let Some(follow_up) = reminders::prepare(ctx, follow_up, token).await? else {
        return Ok(());
    };
    // Claimed: the pooled connection went back with the claim's statement.
    call_and_finish(ctx, job.attempt, &follow_up, token).await
}

/// Steps 2 and 3 for a follow-up this run holds the claim `token` on, for
/// delivery attempt `attempt`: the call to memory-service, then the outcome
/// recorded while the claim still holds.
pub(super) async fn call_and_finish(
    ctx: &JobContext,
    attempt: u32,
    follow_up: &Claimed,
    token: Uuid,
) -> Result<(), sqlx::Error> {
    let request = store_request(follow_up);
    match ctx.memory.store_follow_up(request).await {
        Ok(message_id) => {
            match ctx
                .statements
                .finish_sent(follow_up.id, token, message_id)
                .await?
            {
                Some(SENT) => {
                    ctx.metrics.delivery("sent");
                    tracing::info!(%message_id, template = %follow_up.template_key, "follow-up delivered");
                }
                Some(CANCELLED) => {
                    ctx.metrics.delivery("sent_after_cancel");
                    tracing::warn!(%message_id, "booking cancelled while the follow-up was on its way: it was stored; recorded on the CANCELLED follow-up");
                }
                Some(state) => {
                    tracing::warn!(state, %message_id, "follow-up changed state during delivery")
                }
                None => {
                    ctx.metrics.delivery("claim_lost");
                    tracing::warn!(%message_id, "claim expired during the call; the run that claimed next records the delivery");
                }
            }
        }
        Err(error) => record_failure(attempt, ctx, follow_up, token, error).await?,
    }
    Ok(())
}

/// The StoreMessage of a follow-up.
fn store_request(follow_up: &Claimed) -> memory::StoreMessageRequest {
    memory::StoreMessageRequest {
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
    }
}

/// The claim was refused: find out why, and act where someone must.
/// `Some(until)` when another run of this attempt holds the claim.
async fn explain_unclaimed(
    job: &DeliverFollowUp,
    ctx: &JobContext,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, sqlx::Error> {
    let Some(row) = store::followups::unclaimed(&ctx.pool, job.follow_up_id).await? else {
        tracing::warn!("follow-up not found; nothing to deliver");
        return Ok(None);
    };
    if row.state != PENDING {
        tracing::debug!(state = row.state, "no longer pending; nothing to do");
    } else if row.booking_state != CONFIRMED {
        // Planned while the booking was being cancelled (the plan's insert
        // read the booking before the cancel committed).
        if store::followups::cancel_for_cancelled_booking(
            &ctx.pool,
            job.follow_up_id,
            maitre_runtime::db::now(),
        )
        .await?
        {
            ctx.metrics.delivery("cancelled");
            tracing::info!("booking cancelled; follow-up cancelled");
        }
    } else if i64::from(row.attempts) != i64::from(job.attempt) - 1 {
        tracing::debug!(
            recorded_attempts = row.attempts,
            "stale attempt; another run owns this follow-up"
        );
    } else {
        // Another run of this attempt holds an unexpired claim.
        tracing::debug!(claimed_until = ?row.claimed_until, "another run is delivering this attempt");
        return Ok(row.claimed_until);
    }
    Ok(None)
}

/// Records a failed call: retry later, FAILED, or CANCELLED (erased), by
/// what the failure means (`FailureKind`) and the attempt budget.
async fn record_failure(
    attempt: u32,
    ctx: &JobContext,
    follow_up: &Claimed,
    token: Uuid,
    error: MemoryError,
) -> Result<(), sqlx::Error> {
    let kind = error.kind();
    let now = maitre_runtime::db::now();
    let budget_used = attempt.saturating_sub(u32::try_from(follow_up.retry_from).unwrap_or(0));
    let exhausted = ctx.policy.deliver_retry.exhausted(budget_used);
    if kind == FailureKind::Config {
        ctx.metrics.memory_config_error(error.code());
        // Once per follow-up (per run of such failures): an operator must
        // act (rotate the token, fix grants), and one line per follow-up
        // says which follow-ups wait; every further attempt logs at WARN.
        let code = format!("{:?}", error.code());
        let repeated = follow_up
            .last_error
            .as_deref()
            .is_some_and(|last| last.contains(&format!("failed: {code}")));
        if !repeated {
            tracing::error!(%error, "memory-service refuses booking-service's credentials or set-up; \
                the follow-up keeps retrying on the long schedule: fix BOOKING_MEMORY_TOKEN_FILE / \
                memory-service's AUTH_GRANTS, then RetryFollowUps re-drives any that FAILED meanwhile");
        }
    }
    let after = match kind {
        FailureKind::Erased => AfterFailure::Cancelled,
        FailureKind::Permanent => AfterFailure::Failed,
        FailureKind::Transient | FailureKind::Config if exhausted => AfterFailure::Failed,
        FailureKind::Transient | FailureKind::Config => {
            let delay = ctx.policy.deliver_retry.delay(budget_used, jitter());
            AfterFailure::Retry(now + chrono::Duration::from_std(delay).unwrap_or_default())
        }
    };
    let message = match kind {
        FailureKind::Erased => format!("{CONVERSATION_ERASED}: {error}"),
        _ => error.to_string(),
    };
    let mut tx = ctx.pool.begin().await?;
    let Some(attempts) =
        store::followups::finish_failed_attempt(&mut tx, follow_up.id, token, &message, after, now)
            .await?
    else {
        tx.rollback().await?;
        tracing::info!(%error, "delivery failed, but the follow-up was cancelled or claimed by another run meanwhile");
        return Ok(());
    };
    if let AfterFailure::Retry(next_at) = after {
        let retry = DeliverFollowUp {
            follow_up_id: follow_up.id,
            attempt: u32::try_from(attempts)
                .unwrap_or(u32::MAX)
                .saturating_add(1),
            trace_parent: current_trace(),
        };
        if store::jobs::push_deliver(&mut tx, &retry, next_at).await? == Enqueued::AlreadyLive {
            tracing::warn!(
                attempt = retry.attempt,
                "a live job already held the next attempt's key"
            );
        }
    }
    tx.commit().await?;
    match after {
        AfterFailure::Retry(next_at) => {
            ctx.wakeups.wake_at(DELIVER_QUEUE, next_at);
            ctx.metrics.delivery("retried");
            tracing::warn!(%error, %next_at, attempts, "delivery failed; retrying later");
        }
        AfterFailure::Failed => {
            ctx.metrics.delivery("failed");
            tracing::error!(%error, attempts, ?kind, "follow-up FAILED: giving up (dead letter; RetryFollowUp re-drives it)");
        }
        AfterFailure::Cancelled => {
            ctx.metrics.delivery("erased");
            tracing::info!(%error, "conversation erased in memory-service; follow-up CANCELLED, never to be stored");
        }
    }
    Ok(())
}

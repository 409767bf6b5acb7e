//! RetryFollowUp and RetryFollowUps: re-driving the dead letter. Each call
//! is one short transaction: the follow-ups move FAILED → PENDING (fresh
//! attempt budget) and their next delivery jobs are enqueued, together.

use maitre_api::booking::v1 as pb;
use maitre_runtime::rpc::CallContext;
use sqlx::PgPool;

use super::convert;
use crate::{
    domain::redrive::{self, RedriveBatch},
    error::Error,
    jobs::{DELIVER_QUEUE, DeliverFollowUp, wakeups::Wakeups},
    store::{
        self,
        followups::{CANCELLED, FAILED, PENDING, SENT},
    },
};

fn state_name(state: i16) -> &'static str {
    match state {
        PENDING => "PENDING",
        SENT => "SENT",
        CANCELLED => "CANCELLED",
        FAILED => "FAILED",
        _ => "UNSPECIFIED",
    }
}

/// The first delivery job of a re-driven follow-up: the attempt after those made.
fn next_job(follow_up_id: uuid::Uuid, attempts: i32) -> DeliverFollowUp {
    DeliverFollowUp {
        follow_up_id,
        attempt: u32::try_from(attempts).unwrap_or(0).saturating_add(1),
        trace_parent: CallContext::current().map(|c| c.trace.header_value()),
    }
}

pub async fn retry_follow_up(
    pool: &PgPool,
    wakeups: &Wakeups,
    request: pb::RetryFollowUpRequest,
) -> Result<pb::RetryFollowUpResponse, Error> {
    let id = redrive::follow_up_id(&request)?;
    let now = maitre_runtime::db::now();
    let mut tx = pool.begin().await?;
    let redriven = store::followups::redrive(&mut tx, &[id], now).await?;
    let cancelled = if let Some(&(_, attempts)) = redriven.first() {
        store::jobs::push_delivers_now(&mut tx, &[next_job(id, attempts)]).await?;
        0
    } else {
        store::followups::cancel_failed_of_cancelled_bookings(&mut tx, &[id], now).await?
    };
    tx.commit().await?;
    if !redriven.is_empty() {
        wakeups.poke(DELIVER_QUEUE);
    }
    if cancelled > 0 {
        tracing::info!(follow_up_id = %id, "FAILED follow-up of a cancelled booking: CANCELLED, not re-driven");
        return Err(Error::FollowUpBookingCancelled(id));
    }
    let view = store::followups::redrive_view(pool, id)
        .await?
        .ok_or(Error::FollowUpNotFound(id))?;
    if redriven.is_empty() {
        match view.follow_up.state {
            CANCELLED => return Err(Error::FollowUpCancelled(id)),
            // Re-driven before (this is a retry of the call): same answer.
            PENDING | SENT if view.redriven_at.is_some() => {}
            state => {
                return Err(Error::FollowUpNotFailed {
                    id,
                    state: state_name(state),
                });
            }
        }
    } else {
        tracing::info!(follow_up_id = %id, "FAILED follow-up re-driven: PENDING with a fresh attempt budget");
    }
    Ok(pb::RetryFollowUpResponse {
        follow_up: Some(convert::follow_up(view.follow_up)),
    })
}

pub async fn retry_follow_ups(
    pool: &PgPool,
    wakeups: &Wakeups,
    request: pb::RetryFollowUpsRequest,
) -> Result<pb::RetryFollowUpsResponse, Error> {
    let now = maitre_runtime::db::now();
    let batch = RedriveBatch::parse(request, now)?;
    let mut tx = pool.begin().await?;
    let page = store::followups::failed_page(
        &mut tx,
        (batch.from, batch.until),
        batch.after.unwrap_or((batch.from, uuid::Uuid::nil())),
        i64::from(batch.limit),
    )
    .await?;
    let ids: Vec<uuid::Uuid> = page.iter().map(|(id, _)| *id).collect();
    let redriven = store::followups::redrive(&mut tx, &ids, now).await?;
    let jobs: Vec<DeliverFollowUp> = redriven
        .iter()
        .map(|&(id, attempts)| next_job(id, attempts))
        .collect();
    store::jobs::push_delivers_now(&mut tx, &jobs).await?;
    let cancelled =
        store::followups::cancel_failed_of_cancelled_bookings(&mut tx, &ids, now).await?;
    tx.commit().await?;
    if !jobs.is_empty() {
        wakeups.poke(DELIVER_QUEUE);
    }
    let next_page_token = match page.last() {
        Some(&(id, failed_at)) if page.len() == batch.limit as usize => {
            batch.next_token((failed_at, id))
        }
        _ => String::new(),
    };
    tracing::info!(
        retried = redriven.len(),
        cancelled,
        more = !next_page_token.is_empty(),
        "FAILED follow-ups re-driven"
    );
    Ok(pb::RetryFollowUpsResponse {
        retried: i32::try_from(redriven.len()).unwrap_or(i32::MAX),
        cancelled: i32::try_from(cancelled).unwrap_or(i32::MAX),
        next_page_token,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn re_driving_is_for_admin_only() {
        // `admin=*` grants it; the assistant's list must not.
        let grants = crate::startup::DEFAULT_GRANTS;
        assert!(grants.contains("admin=*"));
        assert!(!grants.contains("RetryFollowUp"), "{grants}");
    }
}

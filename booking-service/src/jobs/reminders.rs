//! Reminders at delivery. A reminder (trigger `pre_event`) is written with
//! its booking, unworded. Each delivery attempt words it afresh from the
//! booking as it is then (a MoveBooking since changes the date, also after
//! a failed attempt), with a template of its own trigger; one whose event
//! has started is cancelled instead (a retry, a re-drive or the sweep must
//! not remind anyone of an event that began). Reminders are about the
//! event, not the customer's mood: the choice sees no emotion history
//! (`requires_history` templates never match), and no call to memory-service
//! is made for it.

use uuid::Uuid;

use super::JobContext;
use crate::{
    domain::{
        PRE_EVENT_TRIGGER,
        template::{EmotionSummary, choose, render},
    },
    store::{self, followups::Claimed},
};

/// The `last_error` of a reminder whose event started before it went out.
pub const TOO_LATE: &str = "REMINDER_TOO_LATE: the event had started before the reminder went out";

/// Readies a claimed follow-up for its call: a reminder is worded now (or
/// cancelled, its event having started), anything else passes as it is.
/// None: nothing to deliver for this run (cancelled now, booking gone, or
/// the claim lost meanwhile).
pub async fn prepare(
    ctx: &JobContext,
    mut follow_up: Claimed,
    token: Uuid,
) -> Result<Option<Claimed>, sqlx::Error> {
    if follow_up.trigger != PRE_EVENT_TRIGGER {
        return Ok(Some(follow_up));
    }
    let Some(booking) = ctx.statements.to_plan(follow_up.booking_id).await? else {
        store::followups::release_claim(&ctx.pool, follow_up.id, token).await?;
        return Ok(None);
    };
    if booking.slot_starts_at.to_utc() <= chrono::Utc::now() {
        if store::followups::cancel_claimed(&ctx.pool, follow_up.id, token, TOO_LATE).await? {
            ctx.metrics.delivery("reminder_too_late");
            tracing::info!("the event has started: reminder cancelled, not sent");
        }
        return Ok(None);
    }
    let templates = ctx.templates.get(&ctx.pool).await?;
    let Some(template) = choose(&templates, &follow_up.trigger, &EmotionSummary::default()) else {
        // The job fails and runs again; the claim's lease then lets the
        // next run in, once a template exists.
        return Err(sqlx::Error::Protocol(format!(
            "no follow-up template for trigger {}: booking.followup_templates needs one with \
             requires_history = false",
            follow_up.trigger
        )));
    };
    let text = render(&template.body, &booking.render_context());
    if !store::followups::set_wording(&ctx.pool, follow_up.id, token, &template.key, &text).await? {
        // Cancelled or erased since the claim: nothing to send.
        store::followups::release_claim(&ctx.pool, follow_up.id, token).await?;
        return Ok(None);
    }
    follow_up.template_key = template.key.clone();
    follow_up.rendered_text = text;
    Ok(Some(follow_up))
}

//! Validated inputs and the rules of booking-service. The domain parses
//! requests as decoded from the wire (the generated `pb` types) into domain
//! values; it knows nothing of tonic or the transport, of sqlx or of the
//! job runner.

pub mod backoff;
pub mod booking;
pub mod erasure;
pub mod followup_jobs;
pub mod hold;
pub mod idempotency;
pub mod redrive;
pub mod slot;
pub mod template;

/// The `trigger` of the follow-up every booking gets after its event.
pub const POST_EVENT_TRIGGER: &str = "post_event";
/// The `trigger` of the reminder a booking gets before its event
/// (BOOKING_REMINDER_LEAD ahead, when booked earlier than that).
pub const PRE_EVENT_TRIGGER: &str = "pre_event";
